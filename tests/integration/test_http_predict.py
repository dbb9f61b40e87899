"""POST /predict over a real uvicorn: every input format, the conversion rules, the response, the error codes."""

from __future__ import annotations

import base64
import io
from typing import Annotated

import numpy as np
import pytest
from fastapi import FastAPI, Query
from mixserver import png_bytes
from PIL import Image

from service.api.app import create_app
from service.config import Settings
from service.mi.params import Mode

pytestmark = pytest.mark.integration


def digit() -> np.ndarray:
    px = np.zeros((8, 8), np.uint8)
    px[1:7, 3] = 255
    px[1, 2] = 180
    px[6, 2:6] = 220
    return px


def probs_of(pred: dict) -> np.ndarray:
    return np.array([pred["probabilities"][f"class{k}"] for k in range(4)])


def check_prediction(pred: dict) -> None:
    p = probs_of(pred)
    assert p.sum() == pytest.approx(1.0, abs=1e-5)
    assert pred["class_index"] == int(np.argmax(p)) and pred["label"] == f"class{pred['class_index']}"
    assert pred["threshold"] == pytest.approx(0.2)
    assert pred["mode"] in ("pl", "ol")
    assert pred["adversarial"] == (pred["detection_gap"] >= pred["threshold"])
    assert pred["mixes"] == (20 if pred["adversarial"] else 5)
    assert pred["mode"] == ("ol" if pred["adversarial"] else "pl")


def test_raw_png_body_gets_a_full_prediction(server):
    r = server.client.post("/predict", content=png_bytes(digit()), headers={"content-type": "image/png"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "tiny" and body["version"] == "1"
    assert len(body["predictions"]) == 1
    check_prediction(body["predictions"][0])
    assert r.headers["content-type"] == "application/json"


def test_every_format_gives_the_plain_model_output_in_mode_off(server, plain):
    px = digit()
    expected = plain(px / 255.0)[0]
    arr = (px / 255.0).tolist()
    bodies = [
        {"content": png_bytes(px), "headers": {"content-type": "image/png"}},
        {"files": [("images", ("d.png", png_bytes(px), "image/png"))]},
        {"json": {"instances": [{"b64": base64.b64encode(png_bytes(px)).decode()}]}},
        {"json": {"instances": [arr]}},
        {"json": {"instances": [[arr]]}},
    ]
    for kwargs in bodies:
        r = server.client.post("/predict?mode=off", **kwargs)
        assert r.status_code == 200, r.text
        pred = r.json()["predictions"][0]
        np.testing.assert_allclose(probs_of(pred), expected, atol=1e-5)
        assert pred["mode"] == "off" and pred["adversarial"] is None and pred["detection_gap"] is None
        assert pred["mixes"] == 0


def test_multipart_with_several_parts_keeps_their_order(server, plain):
    imgs = [digit(), np.full((8, 8), 250, np.uint8), np.zeros((8, 8), np.uint8)]
    files = [("images", (f"{i}.png", png_bytes(px), "image/png")) for i, px in enumerate(imgs)]
    r = server.client.post("/predict?mode=off", files=files)
    assert r.status_code == 200, r.text
    got = np.stack([probs_of(p) for p in r.json()["predictions"]])
    np.testing.assert_allclose(got, plain(np.stack(imgs) / 255.0), atol=1e-5)


def test_conversions_apply_before_the_model(server, plain):
    """EXIF rotation, alpha onto black, RGB -> luma, 16-bit -> 8-bit and resizing, checked against onnxruntime."""
    px = digit()
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.fromarray(px).save(buf, "PNG", exif=exif)
    rotated = np.rot90(px, k=-1) / 255.0

    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., :3] = 255
    rgba[..., 3] = px  # white with the digit as alpha -> on black it is the digit
    wide = px.astype(np.uint16) * 257
    big = np.kron(px, np.ones((4, 4), np.uint8))  # 32x32 blocky digit, resized to 8x8
    cases = [
        (buf.getvalue(), rotated),
        (png_bytes(rgba, "RGBA"), px / 255.0),
        (png_bytes(np.repeat(px[:, :, None], 3, axis=2), "RGB"), px / 255.0),
        (png_bytes(wide), px / 255.0),
        (png_bytes(big), px / 255.0),
    ]
    for data, expected_pixels in cases:
        r = server.client.post("/predict?mode=off", content=data, headers={"content-type": "image/png"})
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(probs_of(r.json()["predictions"][0]), plain(expected_pixels)[0], atol=2e-3)


def test_top_k_returns_the_k_most_probable_classes_in_order(server):
    r = server.client.post("/predict?top_k=2", json={"instances": [(digit() / 255.0).tolist()]})
    assert r.status_code == 200, r.text
    pred = r.json()["predictions"][0]
    probs = list(pred["probabilities"].values())
    assert len(probs) == 2 and probs[0] >= probs[1]
    assert next(iter(pred["probabilities"])) == pred["label"]
    r = server.client.post("/predict?top_k=99", json={"instances": [(digit() / 255.0).tolist()]})
    assert len(r.json()["predictions"][0]["probabilities"]) == 4


@pytest.mark.parametrize("mode", ["pl", "ol"])
def test_mode_override_when_allowed(server, mode):
    r = server.client.post(f"/predict?mode={mode}", json={"instances": [(digit() / 255.0).tolist()]})
    assert r.status_code == 200, r.text
    pred = r.json()["predictions"][0]
    assert pred["mode"] == mode
    if mode == "ol":
        assert pred["adversarial"] is None and pred["detection_gap"] is None and pred["mixes"] == 30
    else:
        assert pred["mixes"] == 5 and pred["adversarial"] == (pred["detection_gap"] >= 0.2)


def _truncated_png() -> bytes:
    return png_bytes(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8))[:-60]


@pytest.mark.parametrize(
    ("kwargs", "status", "code", "needle"),
    [
        ({"content": b"not an image", "headers": {"content-type": "image/png"}}, 400, "invalid_input", "identify"),
        ({"content": _truncated_png(), "headers": {"content-type": "image/png"}}, 400, "invalid_input", "truncated"),
        ({"json": {"instances": []}}, 400, "invalid_input", "no image"),
        ({"json": {"instances": [np.zeros((3, 8, 8)).tolist()]}}, 400, "invalid_input", "shaped (1, 8, 8)"),
        ({"json": {"instances": [np.full((8, 8), 1.5).tolist()]}}, 400, "invalid_input", "[0, 1]"),
        (
            {"content": b'{"instances": [[[NaN]]]}', "headers": {"content-type": "application/json"}},
            400,
            "invalid_input",
            "JSON",
        ),
        ({"json": {"instances": [{"b64": "%%%"}]}}, 400, "invalid_input", "base64"),
        ({"json": {"images": []}}, 400, "invalid_input", "instances"),
        ({"content": b"{", "headers": {"content-type": "application/json"}}, 400, "invalid_input", "not valid JSON"),
        ({"files": [("note", (None, "text only"))]}, 400, "invalid_input", "no image"),
        ({"content": b"abc", "headers": {"content-type": "text/plain"}}, 415, "unsupported_media_type", "text/plain"),
        ({"content": b"abc", "headers": {"content-type": "image/tiff"}}, 415, "unsupported_media_type", "image/tiff"),
        ({"content": b"abc"}, 415, "unsupported_media_type", "(none)"),
    ],
)
def test_client_mistakes_get_their_status_and_message(server, kwargs, status, code, needle):
    r = server.client.post("/predict", **kwargs)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code and needle in err["message"]
    assert "Traceback" not in r.text


def test_invalid_query_is_422_in_the_same_error_shape(server):
    r = server.client.post("/predict?top_k=0", content=png_bytes(digit()), headers={"content-type": "image/png"})
    assert r.status_code == 422
    assert r.json()["error"]["code"] == "validation_error" and "top_k" in r.json()["error"]["message"]
    r = server.client.post("/predict?mode=fast", content=png_bytes(digit()), headers={"content-type": "image/png"})
    assert r.status_code == 422 and "mode" in r.json()["error"]["message"]


QUERY_422 = {
    "top_k=0": "query.top_k: Input should be greater than or equal to 1",
    "top_k=100001": "query.top_k: Input should be less than or equal to 100000",
    "top_k=": "query.top_k: Input should be a valid integer, unable to parse string as an integer",
    "top_k=1.5": "query.top_k: Input should be a valid integer, unable to parse string as an integer",
    "mode=OFF": "query.mode: Input should be 'combined', 'pl', 'ol' or 'off'",
    "mode=fast&top_k=0": "query.top_k: Input should be greater than or equal to 1; "
    "query.mode: Input should be 'combined', 'pl', 'ol' or 'off'",
    "top_k=2&top_k=0": "query.top_k: Input should be greater than or equal to 1",  # the last value counts
}


@pytest.mark.parametrize("query", sorted(QUERY_422))
def test_query_messages_are_fastapis(server, query):
    """The hand-parsed query gives the messages FastAPI gave for declared Query parameters (recorded from it)."""
    r = server.client.post(f"/predict?{query}", json={"instances": [(digit() / 255.0).tolist()]})
    assert r.status_code == 422
    assert r.json()["error"] == {"code": "validation_error", "message": QUERY_422[query]}


def test_query_values_that_fastapi_accepts(server):
    one = {"instances": [(digit() / 255.0).tolist()]}
    for query, k in (("top_k=0&top_k=2", 2), ("top_k=%201", 1), ("top_k=+3", 3), ("top_k=3&other=1", 3)):
        r = server.client.post(f"/predict?{query}", json=one)
        assert r.status_code == 200 and len(r.json()["predictions"][0]["probabilities"]) == k, query


def test_hand_declared_query_parameters_match_fastapis_declaration():
    """/predict parses its query by hand (speed); its OpenAPI entry must equal what FastAPI declares for Query()."""
    ref = FastAPI()

    @ref.post("/predict")
    async def predict(
        top_k: Annotated[
            int | None,
            Query(
                ge=1,
                le=100_000,
                description="return the k most probable classes (at most 3 at MIXINFER_RESPONSE_DETAIL=label)",
            ),
        ] = None,
        mode: Annotated[Mode | None, Query(description="combined (default); others need ALLOW_MODE_OVERRIDE")] = None,
    ) -> None:
        return None

    expected = ref.openapi()
    got = create_app(Settings(providers=("CPUExecutionProvider",))).openapi()
    assert got["paths"]["/predict"]["post"]["parameters"] == expected["paths"]["/predict"]["post"]["parameters"]
    assert got["components"]["schemas"]["Mode"] == expected["components"]["schemas"]["Mode"]


def test_too_many_images_is_413(http_store):
    from mixserver import run_server, settings_for

    with run_server(settings_for(http_store, max_images_per_request=2, max_body_bytes=4096)) as srv:
        one = (digit() / 255.0).tolist()
        r = srv.client.post("/predict", json={"instances": [one] * 3})
        assert r.status_code == 413 and "3 images, the limit is 2" in r.json()["error"]["message"]
        files = [("images", (f"{i}.png", png_bytes(digit()), "image/png")) for i in range(3)]
        r = srv.client.post("/predict", files=files)
        assert r.status_code == 413, r.text
        # body limit by Content-Length, before reading
        r = srv.client.post("/predict", content=b"x" * 5000, headers={"content-type": "image/png"})
        assert r.status_code == 413 and "4096 bytes" in r.json()["error"]["message"]

        # body limit while reading: chunked upload without Content-Length
        def chunks():
            for _ in range(10):
                yield b"y" * 1000

        r = srv.client.post("/predict", content=chunks(), headers={"content-type": "image/png"})
        assert r.status_code == 413 and "more than 4096 bytes sent" in r.json()["error"]["message"]
        assert srv.client.get("/health/live").status_code == 200  # the server is fine afterwards


def test_too_many_pixels_is_413(http_store):
    from mixserver import run_server, settings_for

    with run_server(settings_for(http_store, max_pixels=100)) as srv:
        r = srv.client.post(
            "/predict", content=png_bytes(np.zeros((20, 20), np.uint8)), headers={"content-type": "image/png"}
        )
        assert r.status_code == 413 and "400 pixels, the limit is 100" in r.json()["error"]["message"]


def test_strict_size_refuses_other_sizes(http_store):
    from mixserver import run_server, settings_for

    with run_server(settings_for(http_store, strict_size=True)) as srv:
        r = srv.client.post(
            "/predict", content=png_bytes(np.zeros((9, 8), np.uint8)), headers={"content-type": "image/png"}
        )
        assert r.status_code == 400 and "expected exactly 8x8" in r.json()["error"]["message"]


def test_request_id_is_echoed_or_generated(server):
    r = server.client.get("/health/live", headers={"x-request-id": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    generated = server.client.get("/health/live").headers["x-request-id"]
    assert len(generated) == 32 and generated != server.client.get("/health/live").headers["x-request-id"]
    bad = server.client.get("/health/live", headers={"x-request-id": "a b\tc"}).headers["x-request-id"]
    assert bad != "a b\tc" and len(bad) == 32


def test_unknown_route_is_404_json(server):
    r = server.client.get("/nowhere")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


def test_openapi_declares_every_body_type_and_error(server):
    spec = server.client.get("/openapi.json").json()
    op = spec["paths"]["/predict"]["post"]
    content = op["requestBody"]["content"]
    assert {"multipart/form-data", "application/json", "image/png", "image/jpeg"} <= set(content)
    assert {"200", "400", "401", "403", "413", "415", "422", "429", "503", "504"} <= set(op["responses"])
    assert "PredictJsonBody" in spec["components"]["schemas"]
    assert "InferRequest" in spec["components"]["schemas"]
    assert "/v2/models/{name}/infer" in spec["paths"]

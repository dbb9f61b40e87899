"""The hostile/unusual input corpus against the real ``mixinfer serve``: a correct answer or a documented 4xx each.

Valid-but-unusual images are checked against an independent expectation: the served plain probabilities
(``mode=off``, deterministic) must equal this test's own ONNX Runtime run on the pixels the model should see.
After the corpus the server must still be up, must not have answered any 5xx, and must classify correctly.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from corpus import C, Case, H, W, base_image, build_corpus, chw, encode
from PIL import Image
from relserver import Proc, raw_post, read_response, start_serve
from tinybundle import make_tiny_bundle

pytestmark = pytest.mark.integration

NAME = "rgb"
MAX_BODY = 256 * 1024
MAX_IMAGES = 4
MAX_PIXELS = 16 * 1024 * 1024  # per image and per request
OIP_PATH = f"/v2/models/{NAME}/infer"
CASES = build_corpus(MAX_BODY, MAX_IMAGES, MAX_PIXELS, OIP_PATH)
PREDICT_ERROR_CODES = {
    "invalid_input", "payload_too_large", "unsupported_media_type", "bad_request", "validation_error",
}  # fmt: skip


@pytest.fixture(scope="module")
def corpus_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Proc, Path]]:
    store = tmp_path_factory.mktemp("corpus-store")
    bundle = make_tiny_bundle(store, name=NAME, shape=(C, H, W), n_classes=4, seed=3)
    served = start_serve(
        store,
        NAME,
        store / "serve.log",
        allow_mode_override=True,
        response_detail="full",  # every probability: compared with an independent ONNX Runtime run
        max_body_bytes=MAX_BODY,
        max_images_per_request=MAX_IMAGES,
        max_pixels=MAX_PIXELS,
        max_pixels_per_request=MAX_PIXELS,
    )
    try:
        yield served, bundle
    finally:
        served.stop()


def expected_probs(bundle: Path, pixels_u8: np.ndarray) -> np.ndarray:
    """softmax(model(pixels / 255)) by onnxruntime directly: the oracle does not go through the server."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(bundle / "model.onnx"), providers=["CPUExecutionProvider"])
    x = (pixels_u8.astype(np.float32) / np.float32(255.0))[None]
    (logits,) = sess.run(["logits"], {"images": x})
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    return (z / z.sum(axis=1, keepdims=True))[0]


def send(port: int, case: Case, path: str) -> tuple[int, bytes]:
    """One request over a fresh connection (http.client: exact control of headers and chunking)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        headers = dict(case.headers)
        if case.chunked:
            chunks = [case.body[i : i + 16384] for i in range(0, len(case.body), 16384)]
            conn.request("POST", path, body=iter(chunks), headers=headers, encode_chunked=True)
        else:
            conn.request("POST", path, body=case.body, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def served_probs(case: Case, payload: dict) -> np.ndarray:
    if case.path == OIP_PATH:
        out = next(o for o in payload["outputs"] if o["name"] == "probabilities")
        assert out["shape"] == [1, 4]
        return np.asarray(out["data"], dtype=np.float64)
    (pred,) = payload["predictions"]
    assert pred["mode"] == "off"
    return np.asarray([pred["probabilities"][f"class{k}"] for k in range(4)], dtype=np.float64)


def test_corpus_is_large_enough() -> None:
    assert len(CASES) >= 40
    assert len({c.name for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_input(corpus_server: tuple[Proc, Path], case: Case) -> None:
    served, bundle = corpus_server
    path = case.path + ("?mode=off" if case.expect is not None and case.path == "/predict" else "")
    status, body = send(served.port, case, path)
    assert status in case.statuses, f"{case.name}: got {status} {body[:300]!r}, expected {sorted(case.statuses)}"
    assert b"Traceback" not in body and b'File "' not in body
    payload = json.loads(body)
    if status >= 400:
        if case.path.startswith("/v2/"):  # OIP routes (infer, repository): {"error": "..."}
            assert isinstance(payload, dict) and isinstance(payload.get("error"), str) and payload["error"]
        else:
            err = payload["error"]
            assert err["code"] in PREDICT_ERROR_CODES and err["message"], payload
            if case.error_code is not None:
                assert err["code"] == case.error_code, payload
    elif case.expect is not None:
        want = expected_probs(bundle, case.expect)
        got = served_probs(case, payload)
        np.testing.assert_allclose(got, want, atol=2e-6, err_msg=f"{case.name}: the model saw other pixels")
    assert served.alive(), f"server died on {case.name}: {served.log()[-2000:]}"


def test_slow_and_abandoned_bodies_do_not_block_others(corpus_server: tuple[Proc, Path]) -> None:
    """8 clients drip a valid PNG over ~2 s, 4 send half a body and vanish; meanwhile 40 normal requests are all
    answered before the first slow body is even complete, and the slow ones get correct answers at the end."""
    served, _ = corpus_server
    png = encode(Image.fromarray(base_image()), "PNG")
    request = raw_post(f"127.0.0.1:{served.port}", "/predict", png, "image/png")
    events: list[tuple[str, float]] = []

    async def slow() -> int:
        reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
        step = max(1, len(request) // 20)
        for i in range(0, len(request), step):
            writer.write(request[i : i + step])
            await writer.drain()
            await asyncio.sleep(0.1)
        events.append(("slow_sent", time.perf_counter()))
        status, _, _ = await read_response(reader)
        writer.close()
        return status

    async def abandoned() -> None:
        _, writer = await asyncio.open_connection("127.0.0.1", served.port)
        writer.write(request[: len(request) // 2])
        await writer.drain()
        await asyncio.sleep(0.3)
        writer.close()

    async def fast() -> list[int]:
        reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
        statuses = []
        for _ in range(40):
            writer.write(request)
            statuses.append((await read_response(reader))[0])
        events.append(("fast_done", time.perf_counter()))
        writer.close()
        return statuses

    async def main() -> tuple[list[int], list[int]]:
        slow_tasks = [asyncio.ensure_future(slow()) for _ in range(8)]
        abandon = [asyncio.ensure_future(abandoned()) for _ in range(4)]
        await asyncio.sleep(0.2)
        fast_statuses = await fast()
        await asyncio.gather(*abandon)
        return fast_statuses, list(await asyncio.wait_for(asyncio.gather(*slow_tasks), timeout=60))

    fast_statuses, slow_statuses = asyncio.run(main())
    assert fast_statuses == [200] * 40
    assert slow_statuses == [200] * 8
    first_slow_done = min(t for e, t in events if e == "slow_sent")
    fast_done = next(t for e, t in events if e == "fast_done")
    assert fast_done < first_slow_done, "normal requests waited for the slow bodies"
    assert served.alive()


def test_server_survives_the_corpus(corpus_server: tuple[Proc, Path]) -> None:
    """Still up, no 5xx ever counted, and a plain valid request is still answered correctly, in every mode."""
    served, bundle = corpus_server
    assert served.alive()
    # (the readiness probe's 503s while the model was loading are expected and excluded)
    five_xx = [(labels, v) for labels, v in served.metric_samples("mixinfer_requests_total")
               if labels["code"].startswith("5") and v > 0 and "health" not in labels["route"]]  # fmt: skip
    assert five_xx == [], five_xx
    hostile = served.metric("mixinfer_requests_total", route="/predict")
    assert hostile >= sum(1 for c in CASES if c.path == "/predict")
    png = encode(Image.fromarray(base_image()), "PNG")
    want = expected_probs(bundle, chw(base_image()))
    r = served.client.post("/predict", params={"mode": "off"}, content=png, headers={"Content-Type": "image/png"})
    assert r.status_code == 200
    got = np.asarray([r.json()["predictions"][0]["probabilities"][f"class{k}"] for k in range(4)])
    np.testing.assert_allclose(got, want, atol=2e-6)
    for _ in range(5):
        r = served.client.post("/predict", content=png, headers={"Content-Type": "image/png"})
        assert r.status_code == 200
        pred = r.json()["predictions"][0]
        assert pred["mode"] in ("pl", "ol") and abs(sum(pred["probabilities"].values()) - 1) < 1e-4
    assert "Traceback" not in served.log()

"""Hostile checks of the query watch in a real server (outside review): a banned client costs no decoding, and a
query the server never answered is not counted as a send, so a client retrying it is not taken for an attacker."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx
import numpy as np
import pytest
from mixserver import Gate, png_bytes, run_server, settings_for


def rgb_image(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)


def post_png(base_url: str, data: bytes) -> httpx.Response:
    return httpx.post(f"{base_url}/predict", content=data, headers={"content-type": "image/png"}, timeout=30)


def test_a_banned_client_is_refused_before_its_body_is_decoded(http_store):
    settings = settings_for(
        http_store, name="rgb", query_watch="ban", query_watch_ban_hits=1, query_watch_resends=0, seed=0
    )
    with run_server(settings) as served:
        image = png_bytes(rgb_image(11))
        assert post_png(served.base_url, image).status_code == 200
        banned = post_png(served.base_url, image)  # an exact resend beyond 0 allowed: the one hit that bans
        assert banned.status_code == 403 and banned.json()["error"]["code"] == "client_banned"
        decodes = served.metric("mixinfer_stage_duration_seconds_count", stage="decode")
        # a banned client's body is not read, decoded or validated: undecodable bytes get the ban, not a 400
        garbage = post_png(served.base_url, b"\x89PNG not really an image" * 100)
        assert garbage.status_code == 403 and garbage.json()["error"]["code"] == "client_banned", garbage.text
        oip = httpx.post(f"{served.base_url}/v2/models/rgb/infer", content=b"{not json", timeout=30)
        assert oip.status_code == 403 and "client refused" in oip.json()["error"], oip.text
        assert served.metric("mixinfer_stage_duration_seconds_count", stage="decode") == decodes


def test_a_retry_of_a_request_the_server_did_not_answer_is_not_a_resend(http_store):
    # no resend allowed: any exact resend of an ANSWERED image is a hit, refused under reject
    gate = Gate(once=True)
    settings = settings_for(
        http_store, name="rgb", query_watch="reject", query_watch_resends=0, request_timeout_s=0.5, seed=0
    )
    with run_server(settings, wrap=gate) as served, ThreadPoolExecutor(1) as pool:
        image = png_bytes(rgb_image(12))
        gate.armed = True
        late = pool.submit(post_png, served.base_url, image)
        assert gate.entered.wait(10)
        assert late.result().status_code == 504  # the server timed out: the client got no answer
        gate.open.set()
        retried = post_png(served.base_url, image)  # what any client does after a 504 (or a 503 overloaded)
        assert retried.status_code == 200, retried.text
        assert served.metric("mixinfer_query_watch_hits_total", scope="client") == 0
        again = post_png(served.base_url, image)  # a resend of an answered image still counts
        assert again.status_code == 403 and again.json()["error"]["code"] == "query_rejected"


def near_copy(image: np.ndarray) -> np.ndarray:
    out = image.copy()
    out[7, 3, 1] ^= 0x80  # one pixel moved: a Square/SimBA-like step
    return out


def test_reject_is_not_bypassed_by_sending_a_refused_query_again(http_store):
    with run_server(settings_for(http_store, name="rgb", query_watch="reject", seed=0)) as served:
        base = rgb_image(13)
        assert post_png(served.base_url, png_bytes(base)).status_code == 200
        step = png_bytes(near_copy(base))
        codes = [post_png(served.base_url, step).status_code for _ in range(3)]
        # the refused near-copy stays refused: an exact resend of it is no retry allowance to answer it
        assert codes == [403, 403, 403], codes
        assert post_png(served.base_url, png_bytes(base)).status_code == 200  # a plain resend is still a retry


def chw_floats(image: np.ndarray) -> np.ndarray:
    return np.transpose(image, (2, 0, 1)).astype(np.float32) / 255.0


def send(base_url: str, front_end: str, image: np.ndarray) -> httpx.Response:
    """One image through one front end of the server."""
    import base64
    import json

    url = f"{base_url}/predict"
    if front_end == "raw":
        return post_png(base_url, png_bytes(image))
    if front_end == "multipart":
        return httpx.post(url, files={"images": ("a.png", png_bytes(image), "image/png")}, timeout=30)
    if front_end == "json_b64":
        return httpx.post(url, json={"instances": [{"b64": base64.b64encode(png_bytes(image)).decode()}]}, timeout=30)
    if front_end == "json_array":
        return httpx.post(url, json={"instances": [chw_floats(image).tolist()]}, timeout=30)
    tensor = chw_floats(image)[None]
    url = f"{base_url}/v2/models/rgb/infer"
    inp = {"name": "images", "shape": list(tensor.shape), "datatype": "FP32"}
    if front_end == "oip_json":
        return httpx.post(url, json={"inputs": [{**inp, "data": tensor.ravel().tolist()}]}, timeout=30)
    head = json.dumps({"inputs": [{**inp, "parameters": {"binary_data_size": tensor.nbytes}}]}).encode()
    return httpx.post(
        url,
        content=head + tensor.astype("<f4").tobytes(),
        headers={"content-type": "application/octet-stream", "inference-header-content-length": str(len(head))},
        timeout=30,
    )


FRONT_ENDS = ("raw", "multipart", "json_b64", "json_array", "oip_json", "oip_binary")


def test_every_front_end_is_screened(http_store):
    with run_server(settings_for(http_store, name="rgb", query_watch="reject", seed=0)) as served:
        for i, front_end in enumerate(FRONT_ENDS):
            base = rgb_image(100 + i)
            assert send(served.base_url, "raw", base).status_code == 200
            refused = send(served.base_url, front_end, near_copy(base))
            assert refused.status_code == 403, (front_end, refused.text)
        assert served.metric("mixinfer_query_watch_refusals_total", reason="query_rejected") == len(FRONT_ENDS)


def test_x_forwarded_for_neither_hides_a_client_nor_blames_another(http_store):
    image = rgb_image(200)
    # no trusted proxy (the default): X-Forwarded-For is ignored, rotating it does not make a new client
    with run_server(settings_for(http_store, name="rgb", query_watch="reject", seed=0)) as served:
        assert post_png(served.base_url, png_bytes(image)).status_code == 200
        spoofed = httpx.post(
            f"{served.base_url}/predict",
            content=png_bytes(near_copy(image)),
            headers={"content-type": "image/png", "x-forwarded-for": "203.0.113.9"},
            timeout=30,
        )
        assert spoofed.status_code == 403
    # behind a trusted proxy (this test plays it, appending the real address): the attacker writes the victim's
    # address first, the hits are its own and the victim is answered
    settings = settings_for(http_store, name="rgb", query_watch="ban", query_watch_ban_hits=1, seed=0)
    settings = settings.model_copy(update={"trusted_proxies": ("127.0.0.1",)})
    with run_server(settings) as served:

        def via_proxy(img: np.ndarray, chain: str) -> httpx.Response:
            return httpx.post(
                f"{served.base_url}/predict",
                content=png_bytes(img),
                headers={"content-type": "image/png", "x-forwarded-for": chain},
                timeout=30,
            )

        assert via_proxy(image, "198.51.100.1, 198.51.100.66").status_code == 200
        banned = via_proxy(near_copy(image), "198.51.100.1, 198.51.100.66")
        assert banned.status_code == 403 and banned.json()["error"]["code"] == "client_banned"
        assert via_proxy(rgb_image(201), "198.51.100.1").status_code == 200  # the victim is not banned
        assert via_proxy(rgb_image(202), "198.51.100.66").status_code == 403  # the attacker is


def test_grpc_is_screened_and_its_forwarded_for_ignored(http_store):
    import tritonclient.grpc as triton
    from test_grpc_oip import grpc_server
    from tritonclient.utils import InferenceServerException

    with contextmanager(grpc_server)(http_store, name="rgb", query_watch="reject", seed=0) as served:
        base = rgb_image(300)
        assert post_png(served.http.base_url, png_bytes(base)).status_code == 200
        tensor = chw_floats(near_copy(base))[None]
        inp = triton.InferInput("images", list(tensor.shape), "FP32")
        inp.set_data_from_numpy(tensor)
        with pytest.raises(InferenceServerException) as refused:  # the same client over gRPC, posing as another
            served.client.infer("rgb", [inp], headers={"x-forwarded-for": "203.0.113.7"})
        assert "nearly repeats earlier queries" in str(refused.value)
        assert served.http.metric("mixinfer_query_watch_refusals_total", reason="query_rejected") == 1

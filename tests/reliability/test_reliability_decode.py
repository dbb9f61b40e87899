"""Decoding never stalls the event loop and its cost per request is bounded (issue 13, items 2 and 3).

Against the real ``python -m service.cli serve`` (uvloop + httptools) on a free loopback port. A 4096x4096 grey PNG
is a few KB encoded but 16.7 Mpx decoded (~0.1 s of decoding): the server decides where to decode by the decoded
pixel count read from the image header, not by the encoded size; large JSON bodies are parsed and converted on a
worker thread; ``MIXINFER_MAX_PIXELS_PER_REQUEST`` bounds the decoding of one request and
``MIXINFER_REQUEST_TIMEOUT_S`` applies while decoding.
"""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from relserver import Proc, raw_post, read_response, start_serve
from tinybundle import make_tiny_bundle

pytestmark = pytest.mark.integration

NAME = "rgb"
SHAPE = (3, 32, 32)
SIDE = 4096
DEFAULT_REQUEST_PIXELS = 64 * 1024 * 1024  # MIXINFER_MAX_PIXELS_PER_REQUEST's default: 4 images of 4096x4096


def big_png(seed: int = 0) -> bytes:
    """A 4096x4096 grey PNG, small encoded (stripes compress well), 16.7 Mpx decoded."""
    row = ((np.arange(SIDE) // 64 + seed) % 2 * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(np.broadcast_to(row, (SIDE, SIDE)).copy(), "L").save(buf, "PNG")
    return buf.getvalue()


def multipart(images: list[bytes], boundary: str = "decodebound") -> tuple[bytes, str]:
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="images"; filename="f{i}.png"\r\n'
        f"Content-Type: image/png\r\n\r\n".encode()
        + data
        + b"\r\n"
        for i, data in enumerate(images)
    ]
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("decode-store")
    make_tiny_bundle(root, name=NAME, shape=SHAPE, n_classes=4, seed=5)
    return root


@pytest.fixture(scope="module")
def served(store: Path) -> Iterator[Proc]:
    """Default limits: 256 images, 16 MiB bodies, 16 Mpx per image, 64 Mpx per request, 10 s timeout."""
    proc = start_serve(store, NAME, store / "serve.log")
    try:
        yield proc
    finally:
        proc.stop()


def heavy_request(kind: str, host_port: str) -> tuple[bytes, int]:
    """A decode-heavy request and its answer's status.

    ``png_4096``: a 4096x4096 PNG (~25 KB, ~0.1 s of decoding). ``json_arrays``: 256 array instances (a 5.5 MB
    body) whose very last value is out of range, so that the server converts everything, then answers 400 at once
    without waiting for the engine (with the conversion on the event loop, that answer went out before a probe that
    arrived meanwhile was even read). OIP bodies take the same worker-thread path (``off_loop``)."""
    c, h, w = SHAPE
    if kind == "png_4096":
        return raw_post(host_port, "/predict", big_png(), "image/png"), 200
    values = np.random.default_rng(0).random((256, c, h, w)).round(4)
    values[-1, -1, -1, -1] = 2.0
    body = json.dumps({"instances": values.tolist()}).encode()
    return raw_post(host_port, "/predict", body, "application/json"), 400


@pytest.mark.parametrize("kind", ["png_4096", "json_arrays"])
def test_liveness_is_answered_before_decode_heavy_requests(served: Proc, kind: str) -> None:
    """4 clients send a decode-heavy request each; a liveness probe sent after they have started is answered
    before any of them, and so are the next probes sent one after another on its connection.

    Progress, not time: with the decoding on the event loop, the first probe waited for the decodes and came back
    together with the first answers (2 probes at most came before any PNG answer), or after them (JSON)."""
    host_port = f"127.0.0.1:{served.port}"
    request, expected = heavy_request(kind, host_port)
    live = f"GET /v2/health/live HTTP/1.1\r\nHost: {host_port}\r\n\r\n".encode()
    order: list[tuple[str, int]] = []

    sent = asyncio.Semaphore(0)

    async def heavy() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
        writer.write(request)
        await writer.drain()
        sent.release()
        status, _, _ = await asyncio.wait_for(read_response(reader), timeout=60)
        order.append(("heavy", status))
        writer.close()

    async def main() -> None:
        probe_reader, probe_writer = await asyncio.open_connection("127.0.0.1", served.port)
        tasks = [asyncio.ensure_future(heavy()) for _ in range(4)]
        for _ in tasks:
            await sent.acquire()
        await asyncio.sleep(0.005)  # every heavy request is written and being read or decoded
        while not any(name == "heavy" for name, _ in order) and len(order) < 1000:
            probe_writer.write(live)
            status, _, _ = await asyncio.wait_for(read_response(probe_reader), timeout=60)
            order.append(("live", status))
        probe_writer.close()
        await asyncio.gather(*tasks)

    asyncio.run(main())
    heavy_statuses = [status for name, status in order if name == "heavy"]
    assert heavy_statuses == [expected] * 4, order
    assert order[0] == ("live", 200), f"the first liveness probe waited for a decode-heavy request: {order}"
    first_heavy = next(i for i, (name, _) in enumerate(order) if name == "heavy")
    assert first_heavy >= 3, f"only {first_heavy} liveness probes answered while 4 requests were decoded: {order}"


def test_pixels_per_request_over_the_limit_is_413_naming_limit_and_total(served: Proc) -> None:
    """5 images of 4096x4096 (83.9 Mpx) are refused from their headers; 4 (exactly the limit) are served."""
    body, ctype = multipart([big_png(i) for i in range(5)])
    r = served.client.post("/predict", content=body, headers={"Content-Type": ctype})
    assert r.status_code == 413, r.text
    message = r.json()["error"]["message"]
    assert r.json()["error"]["code"] == "payload_too_large"
    assert str(5 * SIDE * SIDE) in message and str(DEFAULT_REQUEST_PIXELS) in message, message
    assert "MIXINFER_MAX_PIXELS_PER_REQUEST" in message
    body, ctype = multipart([big_png(i) for i in range(4)])
    r = served.client.post("/predict", content=body, headers={"Content-Type": ctype})
    assert r.status_code == 200, r.text
    assert len(r.json()["predictions"]) == 4


def test_the_issue_request_of_64_big_images_is_refused_before_decoding(served: Proc) -> None:
    """64 x 4096x4096 (1.07 Gpx, seconds of decoding) in one JSON body: 413 from the headers alone."""
    import base64

    b64 = base64.b64encode(big_png()).decode()
    r = served.client.post("/predict", json={"instances": [{"b64": b64}] * 64})
    assert r.status_code == 413, r.text
    assert str(64 * SIDE * SIDE) in r.json()["error"]["message"]


def test_request_timeout_applies_while_decoding(store: Path) -> None:
    """A 0.2 s request timeout and 4 images of 0.1 s decoding each: 504 while decoding, not after."""
    proc = start_serve(store, NAME, store / "timeout.log", request_timeout_s=0.2)
    try:
        body, ctype = multipart([big_png(i) for i in range(4)])
        r = proc.client.post("/predict", content=body, headers={"Content-Type": ctype})
        assert r.status_code == 504, r.text
        err = r.json()["error"]
        assert err["code"] == "deadline_exceeded" and "decod" in err["message"], err
        assert "MIXINFER_REQUEST_TIMEOUT_S" in err["message"]
        small = io.BytesIO()
        Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(small, "PNG")
        r = proc.client.post("/predict", content=small.getvalue(), headers={"Content-Type": "image/png"})
        assert r.status_code == 200, r.text
    finally:
        proc.stop()

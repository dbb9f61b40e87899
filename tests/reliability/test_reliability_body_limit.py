"""A 413 for an oversized body reaches clients that send their whole body before reading (issue 13, item 4).

Python's ``urllib`` and ``requests`` write the whole body, then read the answer: when the server answered 413 and
closed while they were still sending, they reported "connection reset" instead of the 413. The server now reads and
discards the rest of the body (bounded in bytes and time) before it answers and closes, so these clients read the
413; a slow or endless body is cut off at the bound and never holds the server. Against the real
``python -m service.cli serve`` on a free loopback port.
"""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
import requests
from relserver import Proc, start_serve
from tinybundle import make_tiny_bundle

pytestmark = pytest.mark.integration

MAX_BODY = 256 * 1024
#: far more than the loopback socket buffers hold: the client is still sending when the limit trips
BIG = 24 * 1024 * 1024
#: the drain bound in time (service.api.middleware.DRAIN_MAX_S) plus slack for a loaded machine
CUT_OFF_S = 5.0 + 10.0


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proc]:
    store = tmp_path_factory.mktemp("limit-store")
    make_tiny_bundle(store, name="tiny", seed=0)
    proc = start_serve(store, "tiny", store / "serve.log", max_body_bytes=MAX_BODY)
    try:
        yield proc
    finally:
        proc.stop()


def _assert_413(body: bytes) -> None:
    err = json.loads(body)["error"]
    assert err["code"] == "payload_too_large" and str(MAX_BODY) in err["message"], err


def test_urllib_reads_the_413_of_a_declared_oversized_body(served: Proc) -> None:
    req = urllib.request.Request(
        served.base_url + "/predict", data=b"\0" * BIG, headers={"Content-Type": "image/png"}, method="POST"
    )
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(req, timeout=60)
    assert info.value.code == 413
    _assert_413(info.value.read())


def test_requests_reads_the_413_of_a_declared_oversized_body(served: Proc) -> None:
    r = requests.post(served.base_url + "/predict", data=b"\0" * BIG, headers={"Content-Type": "image/png"}, timeout=60)
    assert r.status_code == 413
    _assert_413(r.content)


def test_requests_reads_the_413_of_a_chunked_body_over_the_limit(served: Proc) -> None:
    """No Content-Length: the limit trips while reading; the rest is drained before the 413."""
    chunks = (b"\0" * 65536 for _ in range(BIG // 65536))
    r = requests.post(served.base_url + "/predict", data=chunks, headers={"Content-Type": "image/png"}, timeout=60)
    assert r.status_code == 413
    _assert_413(r.content)


def test_oip_route_413_is_readable_too(served: Proc) -> None:
    r = requests.post(
        served.base_url + "/v2/models/tiny/infer",
        data=b"\0" * BIG,
        headers={"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": "2"},
        timeout=60,
    )
    assert r.status_code == 413
    assert "request body too large" in r.json()["error"]


def _read_until_closed(sock: socket.socket, limit_s: float) -> bytes:
    data = b""
    end = time.monotonic() + limit_s
    while time.monotonic() < end:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        except ConnectionResetError:
            break
        if not chunk:
            break
        data += chunk
    return data


@pytest.mark.parametrize("framing", ["declared_1tb", "chunked"])
def test_an_endless_body_is_cut_off_and_never_holds_the_server(served: Proc, framing: str) -> None:
    """A client keeps sending forever (1 TB declared, or chunks without end): the server stops reading within the
    drain bound and closes, while other clients are served meanwhile."""
    sock = socket.create_connection(("127.0.0.1", served.port), timeout=0.2)
    framing_header = b"Content-Length: 1000000000000" if framing == "declared_1tb" else b"Transfer-Encoding: chunked"
    sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n" + framing_header + b"\r\n\r\n")
    block = b"\0" * 65536
    if framing == "chunked":
        block = b"%x\r\n" % len(block) + block + b"\r\n"
    t0 = time.monotonic()
    closed_after = None
    while time.monotonic() - t0 < CUT_OFF_S:
        try:
            for _ in range(64):
                sock.sendall(block)
        except TimeoutError:
            pass  # the server is not reading (any more)
        except (BrokenPipeError, ConnectionResetError):
            closed_after = time.monotonic() - t0
            break
        assert served.client.get("/v2/health/live", timeout=5).status_code == 200
    sock.close()
    assert closed_after is not None, f"the server still held the endless body after {CUT_OFF_S} s"


def test_a_slow_body_over_the_limit_is_cut_off(served: Proc) -> None:
    """Over the limit, then one byte every 50 ms: answered 413 and closed within the drain bound."""
    sock = socket.create_connection(("127.0.0.1", served.port), timeout=0.05)
    sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nTransfer-Encoding: chunked\r\n\r\n")
    sock.sendall(b"%x\r\n" % (MAX_BODY + 1) + b"\0" * (MAX_BODY + 1) + b"\r\n")
    t0 = time.monotonic()
    answer = b""
    while time.monotonic() - t0 < CUT_OFF_S:
        try:
            sock.sendall(b"1\r\n\0\r\n")
        except (BrokenPipeError, ConnectionResetError):
            break
        answer += _read_until_closed(sock, 0.05)
        if answer.endswith(b"}") and b"413" in answer:
            break
    sock.close()
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert time.monotonic() - t0 < CUT_OFF_S


def test_expect_100_continue_gets_the_413_without_sending_the_body(served: Proc) -> None:
    """curl's way: headers with ``Expect: 100-continue``, then wait; the 413 comes at once, no 100 Continue."""
    sock = socket.create_connection(("127.0.0.1", served.port), timeout=10)
    sock.sendall(
        b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 33554432\r\n"
        b"Expect: 100-continue\r\n\r\n"
    )
    answer = _read_until_closed(sock, 10)
    sock.close()
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    _assert_413(answer.split(b"\r\n\r\n", 1)[1])


def test_the_server_is_fine_afterwards(served: Proc) -> None:
    """Still up and ready, and no 5xx counted (the readiness probe's 503s while loading excluded)."""
    assert served.alive()
    assert served.client.get("/v2/health/ready").status_code == 200
    five_xx = [(labels, v) for labels, v in served.metric_samples("mixinfer_requests_total")
               if labels["code"].startswith("5") and v > 0 and "health" not in labels["route"]]  # fmt: skip
    assert five_xx == [], five_xx

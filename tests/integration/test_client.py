"""service.client against real uvicorn servers: every input kind, typed results, errors, keys, retries on 429/503
only (never 403), timeouts, connection reuse, and the async twin."""

from __future__ import annotations

import asyncio
import io
import threading
import time

import numpy as np
import pytest
from mixserver import png_bytes, run_server, settings_for, wait_until
from PIL import Image
from test_http_backpressure import Gate

from service.client import ApiError, AsyncClient, Client, Health, RetryPolicy

pytestmark = pytest.mark.integration

KEY = "client-test-key-0123456789"
PIXELS = (np.arange(64, dtype=np.uint8).reshape(8, 8) * 4).astype(np.uint8)


@pytest.fixture(scope="module")
def keyed(http_store):
    """API keys, one request per second per key (bursts of 1), mode overrides refused."""
    with run_server(settings_for(http_store, model_version="1", api_keys=(KEY,), rate_limit_per_key=1.0)) as srv:
        yield srv


def test_every_input_kind_reaches_the_model_as_the_same_pixels(server, tmp_path):
    path = tmp_path / "digit.png"
    path.write_bytes(png_bytes(PIXELS))
    kinds = [str(path), path, png_bytes(PIXELS), Image.fromarray(PIXELS), PIXELS, PIXELS / 255.0]
    with Client(server.base_url) as client:
        # mode=off answers the plain (deterministic) model: equal probabilities prove equal inputs
        answers = client.predict(kinds, mode="off")
        reference = server.client.post(
            "/predict?mode=off", files=[("images", ("d.png", png_bytes(PIXELS), "image/png"))]
        ).json()["predictions"][0]
    assert len(answers) == len(kinds)
    for p in answers:
        assert p.mode == "off" and p.adversarial is None and p.gap is None
        assert p.label == reference["label"] and p.class_index == reference["class_index"]
        assert p.probabilities == pytest.approx(reference["probabilities"], abs=1e-6)
        assert (p.model, p.model_version) == ("tiny", "1")


def test_predict_returns_typed_results_with_what_the_server_discloses(server):
    with Client(server.base_url) as client:
        (one,) = client.predict(PIXELS)
        two = client.predict([PIXELS, PIXELS], top_k=2)
    assert one.mode in ("pl", "ol") and isinstance(one.adversarial, bool)
    assert one.label in server.holder.model.class_names and one.class_index == int(one.label[5:])
    assert sum(one.probabilities.values()) == pytest.approx(1.0, abs=1e-4)
    assert one.threshold == pytest.approx(server.holder.model.threshold)
    assert one.gap is not None and one.adversarial == (one.gap >= one.threshold)
    assert one.mixes is not None and one.mixes >= 1
    assert [len(p.probabilities) for p in two] == [2, 2]


def test_health_and_metadata(server):
    with Client(server.base_url) as client:
        assert client.health() == Health(live=True, ready=True)
        meta = client.metadata()
    assert (meta.model, meta.model_version) == ("tiny", "1")
    assert meta.classes == ("class0", "class1", "class2", "class3")
    assert meta.input_shape == (1, 8, 8)
    assert meta.response_detail == "full"  # the shared server runs at full detail


def test_server_errors_carry_code_and_message_and_are_not_retried(server):
    before = server.metric("mixinfer_requests_total", route="/predict", code="400")
    with Client(server.base_url) as client, pytest.raises(ApiError) as info:
        client.predict([PIXELS, b"not an image"])
    err = info.value
    assert (err.status, err.code) == (400, "invalid_input")
    assert "image 1" in err.message and err.request_id
    assert server.metric("mixinfer_requests_total", route="/predict", code="400") == before + 1


def test_a_path_that_does_not_exist_fails_before_sending(server, tmp_path):
    with Client(server.base_url) as client, pytest.raises(FileNotFoundError):
        client.predict([tmp_path / "missing.png"])


def test_keys_missing_wrong_and_right(keyed):
    with Client(keyed.base_url) as anonymous, pytest.raises(ApiError) as info:
        anonymous.metadata()
    assert (info.value.status, info.value.code) == (401, "unauthorized")
    assert "missing API key" in info.value.message
    time.sleep(1.1)  # the per-key bucket (1 request/s) refills
    with Client(keyed.base_url, api_key="wrong-key-0123456789") as wrong, pytest.raises(ApiError) as info:
        wrong.predict(PIXELS)
    assert (info.value.status, info.value.code) == (401, "unauthorized")
    time.sleep(1.1)
    with Client(keyed.base_url, api_key=KEY) as right:
        assert right.predict(PIXELS)[0].model == "tiny"


def test_a_403_is_raised_at_once_never_retried(keyed):
    time.sleep(1.1)
    before = keyed.metric("mixinfer_requests_total", route="/predict", code="403")
    with Client(keyed.base_url, api_key=KEY) as client, pytest.raises(ApiError) as info:
        client.predict(PIXELS, mode="off")
    assert (info.value.status, info.value.code) == (403, "forbidden")
    assert "MIXINFER_ALLOW_MODE_OVERRIDE" in info.value.message
    assert keyed.metric("mixinfer_requests_total", route="/predict", code="403") == before + 1


def test_a_429_is_retried_after_its_retry_after(keyed):
    time.sleep(1.1)
    before = keyed.metric("mixinfer_requests_total", route="/predict", code="429")
    with Client(keyed.base_url, api_key=KEY) as client:
        client.predict(PIXELS)  # spends the key's only token
        t0 = time.monotonic()
        (answer,) = client.predict(PIXELS)  # 429 with Retry-After: 1, then 200
        waited = time.monotonic() - t0
    assert answer.label.startswith("class")
    assert keyed.metric("mixinfer_requests_total", route="/predict", code="429") == before + 1
    assert 0.9 <= waited < 5.0


def test_a_429_beyond_the_retries_is_raised_with_its_retry_after(keyed):
    time.sleep(1.1)
    with Client(keyed.base_url, api_key=KEY, retry=RetryPolicy(retries=0)) as client:
        client.predict(PIXELS)
        with pytest.raises(ApiError) as info:
            client.predict(PIXELS)
    assert info.value.status == 429 and info.value.retry_after_s == 1.0
    assert "rate limit" in info.value.message


def test_not_ready_503_is_retried_until_ready_and_a_slow_answer_times_out(http_store):
    gate = Gate()
    gate.hold_warmup = True
    with run_server(settings_for(http_store), wrap=gate, wait_ready=False) as srv:
        with Client(srv.base_url) as client:
            assert client.health() == Health(live=True, ready=False)
        results: list[object] = []
        patient = Client(
            srv.base_url, retry=RetryPolicy(retries=100, backoff_s=0.1, max_wait_s=2.0)
        )  # not-ready 503s say Retry-After: 1
        worker = threading.Thread(target=lambda: results.append(patient.predict(PIXELS)))
        worker.start()
        wait_until(lambda: srv.metric("mixinfer_requests_total", route="/predict", code="503") >= 1, 10, "a 503")
        gate.warm.set()
        worker.join(30)
        patient.close()
        assert len(results) == 1 and len(results[0]) == 1  # type: ignore[arg-type]
        gate.armed = True  # the next batch waits at the gate
        with Client(srv.base_url, timeout_s=0.3) as hasty, pytest.raises(ApiError) as info:
            hasty.predict(PIXELS)
        assert info.value.status is None and info.value.code == "timeout"
        gate.open.set()


def test_no_server_is_a_connection_error(tmp_path):
    import socket

    with socket.socket() as s:  # a free port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with Client(f"http://127.0.0.1:{port}") as client, pytest.raises(ApiError) as info:
        client.predict(PIXELS)
    assert info.value.status is None and info.value.code == "connection_error"


def test_one_client_reuses_one_connection(server):
    connections = server.server.server_state.connections
    before = set(connections)
    with Client(server.base_url) as client:
        for _ in range(5):
            client.predict(PIXELS)
        assert len(set(connections) - before) == 1


def test_the_async_client_does_the_same(server):
    async def run() -> None:
        async with AsyncClient(server.base_url) as client:
            answers = await asyncio.gather(*(client.predict([PIXELS, png_bytes(PIXELS)]) for _ in range(4)))
            assert [len(a) for a in answers] == [2, 2, 2, 2]
            assert (await client.health()).ready
            assert (await client.metadata()).model == "tiny"
            with pytest.raises(ApiError) as info:
                await client.predict(b"\x89PNG truncated")
            assert info.value.code == "invalid_input"

    asyncio.run(run())


def test_pil_images_of_any_mode_are_sent_as_png(server):
    rgb = Image.new("RGB", (8, 8), (255, 255, 255))
    with Client(server.base_url) as client:
        (white,) = client.predict(rgb, mode="off")
    buf = io.BytesIO()
    Image.new("L", (8, 8), 255).save(buf, "PNG")
    with Client(server.base_url) as client:
        (grey,) = client.predict(buf.getvalue(), mode="off")
    assert white.probabilities == pytest.approx(grey.probabilities, abs=1e-6)


def test_the_async_client_retries_a_429_too(keyed):
    time.sleep(1.1)
    before = keyed.metric("mixinfer_requests_total", route="/predict", code="429")

    async def run() -> float:
        async with AsyncClient(keyed.base_url, api_key=KEY) as client:
            await client.predict(PIXELS)
            t0 = time.monotonic()
            (answer,) = await client.predict(PIXELS)
            assert answer.model == "tiny"
            return time.monotonic() - t0

    waited = asyncio.run(run())
    assert keyed.metric("mixinfer_requests_total", route="/predict", code="429") == before + 1
    assert 0.9 <= waited < 5.0


def test_at_the_label_default_gap_threshold_and_mixes_are_none(http_store):
    with run_server(settings_for(http_store, model_version="1")) as srv, Client(srv.base_url) as client:
        (p,) = client.predict(PIXELS)
        assert client.metadata().response_detail == "label"
    assert p.gap is None and p.threshold is None and p.mixes is None
    assert isinstance(p.adversarial, bool) and p.class_index is not None
    assert len(p.probabilities) == 3 and max(p.probabilities, key=p.probabilities.__getitem__) == p.label

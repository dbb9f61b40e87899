"""Soak: 20,000 single-image requests from 64 concurrent keep-alive clients against the real ``mixinfer serve``.

Every request must be answered (200, or 429/503 under overload; none dropped, none hung), no other 5xx, the
resident memory may grow by less than 10 % between warm-up and the end, and the server's own counters must equal
what the client counted. Bounded: the run stops at a time limit, and any request left unanswered then is counted
as lost (the test then fails).
"""

from __future__ import annotations

import asyncio
import io
import os
from collections.abc import Iterator

import numpy as np
import pytest
from PIL import Image
from relserver import Proc, closed_loop, raw_post, start_serve
from tinybundle import make_tiny_bundle

pytestmark = [pytest.mark.integration, pytest.mark.slow]

N_REQUESTS = int(os.environ.get("MIXINFER_SOAK_REQUESTS", "20000"))
CLIENTS = 64
WARMUP = 2000
TIME_LIMIT_S = 200.0
SHAPE = (3, 16, 16)


@pytest.fixture(scope="module")
def soak_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proc]:
    store = tmp_path_factory.mktemp("soak-store")
    make_tiny_bundle(store, name="soak", shape=SHAPE, n_classes=10, pool_per_class=20, seed=5)
    served = start_serve(store, "soak", store / "serve.log")  # default batching and queue settings
    try:
        yield served
    finally:
        served.stop()


def _requests(host_port: str) -> list[bytes]:
    rng = np.random.default_rng(7)
    out = []
    for _ in range(32):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (SHAPE[1], SHAPE[2], 3), dtype=np.uint8)).save(buf, "PNG")
        out.append(raw_post(host_port, "/predict", buf.getvalue(), "image/png"))
    return out


def _counts(served: Proc) -> dict[str, float]:
    """/predict requests by code, summed over model versions."""
    out: dict[str, float] = {}
    for labels, value in served.metric_samples("mixinfer_requests_total"):
        if labels["route"] == "/predict":
            out[labels["code"]] = out.get(labels["code"], 0.0) + value
    return out


def test_soak(soak_server: Proc) -> None:
    served = soak_server
    requests = _requests(f"127.0.0.1:{served.port}")
    warm = asyncio.run(closed_loop("127.0.0.1", served.port, requests, total=WARMUP, clients=CLIENTS,
                                   time_limit_s=60))  # fmt: skip
    assert warm.answered == WARMUP, (warm.status, warm.errors)
    rss_warm = served.rss_mib()
    before = _counts(served)
    predictions_before = served.metric("mixinfer_predictions_total")

    res = asyncio.run(
        closed_loop("127.0.0.1", served.port, requests, total=N_REQUESTS, clients=CLIENTS, time_limit_s=TIME_LIMIT_S)
    )
    rss_end = served.rss_mib()
    after = _counts(served)
    growth = rss_end / rss_warm - 1
    rate = res.answered / res.elapsed_s
    print(  # the README's reliability figures come from this line (pytest -s)
        f"soak: sent {res.sent}, answered {res.answered} {dict(res.status)}, errors {dict(res.errors)}, "
        f"{res.elapsed_s:.1f} s ({rate:.0f} req/s), RSS {rss_warm:.1f} -> {rss_end:.1f} MiB ({100 * growth:+.2f} %)"
    )
    assert res.sent == N_REQUESTS, f"only {res.sent} requests sent within {TIME_LIMIT_S} s"
    assert not res.errors, f"requests lost (no answer): {dict(res.errors)}"
    assert res.answered == N_REQUESTS
    assert set(res.status) <= {200, 429, 503}, dict(res.status)
    assert res.status[200] >= 0.99 * N_REQUESTS, "with default settings a 64-client closed loop should not overload"
    assert res.bad_bodies == 0
    assert growth < 0.10, f"RSS grew {100 * growth:.1f} % ({rss_warm:.1f} -> {rss_end:.1f} MiB)"
    # the server's own counters equal the client's counts, code by code
    delta = {code: after.get(code, 0.0) - before.get(code, 0.0) for code in after}
    assert {c: int(v) for c, v in delta.items() if v} == {str(c): n for c, n in res.status.items()}
    assert served.metric("mixinfer_predictions_total") - predictions_before == res.status[200]
    assert served.alive()

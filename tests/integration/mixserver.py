"""Test helpers: a real uvicorn on a free loopback port, in a thread of the test process, and image bytes."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import uvicorn

from service.api.app import create_app
from service.api.runtime import BackendWrapper
from service.api.serving import Server, uvicorn_config
from service.config import Settings

ADMIN_KEY = "test-admin-key-0123456789"


class Served:
    """A running server: its base URL, the app (for its state) and an httpx client."""

    def __init__(self, base_url: str, app: Any, server: uvicorn.Server) -> None:
        self.base_url = base_url
        self.host_port = base_url.removeprefix("http://")
        self.app = app
        self.server = server
        self.client = httpx.Client(base_url=base_url, timeout=30.0)

    @property
    def holder(self) -> Any:
        return self.app.state.holder

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples of ``name`` from one scrape of /metrics whose labels include ``labels`` (0 if none);
        a sum because most series exist once per model version."""
        return sum(self.metric_by_version(name, **labels).values())

    def metric_by_version(self, name: str, **labels: str) -> dict[tuple[str, str], float]:
        """One scrape: (model, version) -> sum of the matching samples of ``name``."""
        from prometheus_client.parser import text_string_to_metric_families

        out: dict[tuple[str, str], float] = {}
        for fam in text_string_to_metric_families(self.client.get("/metrics").text):
            for s in fam.samples:
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                    key = (s.labels.get("model", ""), s.labels.get("version", ""))
                    out[key] = out.get(key, 0.0) + float(s.value)
        return out


class Gate:
    """Wraps the real backend; once ``armed``, every plain forward waits until ``open`` is set (only the first
    one with ``once``: the gate disarms itself when a forward enters)."""

    def __init__(self, once: bool = False) -> None:
        self.once = once
        self.armed = False
        self.open = threading.Event()
        self.entered = threading.Event()
        self.warm = threading.Event()
        self.hold_warmup = False
        self.seen: list[int] = []

    def __call__(self, inner):
        gate = self

        class Gated:
            n_classes, input_shape, provider = inner.n_classes, inner.input_shape, inner.provider

            def probs(self, x):
                if gate.armed:
                    gate.armed = not gate.once
                    gate.seen.append(len(x))
                    gate.entered.set()
                    assert gate.open.wait(30), "test never opened the gate"
                return inner.probs(x)

            def mean_mix_probs(self, x, p, lam):
                return inner.mean_mix_probs(x, p, lam)

            def warmup(self, sizes, mixes=(1,)):
                if gate.hold_warmup:
                    assert gate.warm.wait(30), "test never released the warm-up"
                inner.warmup(sizes, mixes)

        return Gated()


def wait_until(cond, limit_s: float = 20.0, what: str = "condition") -> None:
    end = time.monotonic() + limit_s
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"{what} not reached within {limit_s} s")
        time.sleep(0.01)


@contextmanager
def run_server(settings: Settings, wrap: BackendWrapper | None = None, wait_ready: bool = True) -> Iterator[Served]:
    """Start uvicorn (port 0 -> a free loopback port) in a thread; stop it on exit."""
    with run_app(create_app(settings, wrap_backend=wrap), wait_ready) as served:
        yield served


@contextmanager
def run_app(app: Any, wait_ready: bool = True) -> Iterator[Served]:
    """Serve an app built elsewhere (e.g. by ``mixinfer serve``'s ``build_app``) like :func:`run_server`."""
    # the configuration of `mixinfer serve` (proxy headers from MIXINFER_TRUSTED_PROXIES only, the drain), on a free
    # loopback port with the asyncio loop and uvicorn's own log set-up at warning level
    config = uvicorn_config(
        app,
        app.state.settings,
        host="127.0.0.1",
        port=0,
        loop="asyncio",
        log_level="warning",
        log_config=uvicorn.config.LOGGING_CONFIG,
        lifespan="on",
    )
    server = Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn-test", daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started or not thread.is_alive(), what="uvicorn start")
        assert server.started, "uvicorn did not start"
        port = server.servers[0].sockets[0].getsockname()[1]
        served = Served(f"http://127.0.0.1:{port}", app, server)
        if wait_ready:
            wait_until(lambda: served.client.get("/v2/health/ready").status_code == 200, what="readiness")
        yield served
        served.client.close()
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def settings_for(store: Path, name: str = "tiny", **kw: Any) -> Settings:
    base: dict[str, Any] = {
        "model_dir": store,
        "model_name": name,
        "providers": ("CPUExecutionProvider",),
        "intra_op_threads": 1,
        "log_json": False,
    }
    return Settings(**(base | kw))


def png_bytes(array: np.ndarray, mode: str | None = None) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array, mode).save(buf, "PNG")
    return buf.getvalue()

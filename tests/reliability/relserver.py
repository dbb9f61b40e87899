"""Reliability-test helpers: the real ``mixinfer serve`` in a subprocess on a free loopback port, a raw HTTP client.

The server runs exactly as deployed (``python -m service.cli serve``, uvloop + httptools, env settings), so the
tests can send it SIGTERM, read its RSS from ``/proc`` and watch it survive hostile input from the outside.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from testtools import stop_process

ROOT = Path(__file__).resolve().parents[2]
PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024
ADMIN_KEY = "reliability-admin-key-0123456789"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve_env(store: Path, name: str, port: int, **settings: object) -> dict[str, str]:
    """Environment for ``mixinfer serve``: MIXINFER_* from keyword arguments (upper-cased)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MIXINFER_")}
    env.update(
        MIXINFER_MODEL_DIR=str(store),
        MIXINFER_MODEL_NAME=name,
        MIXINFER_HOST="127.0.0.1",
        MIXINFER_PORT=str(port),
        MIXINFER_PROVIDERS="CPUExecutionProvider",
        MIXINFER_INTRA_OP_THREADS="1",
        MIXINFER_LOG_JSON="false",
    )
    for key, value in settings.items():
        env[f"MIXINFER_{key.upper()}"] = str(value).lower() if isinstance(value, bool) else str(value)
    return env


@dataclass
class Proc:
    """A ``mixinfer serve`` subprocess."""

    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path
    client: httpx.Client = field(init=False)

    def __post_init__(self) -> None:
        self.client = httpx.Client(base_url=self.base_url, timeout=30.0)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def rss_mib(self) -> float:
        return int(Path(f"/proc/{self.proc.pid}/statm").read_text().split()[1]) * PAGE_KIB / 1024

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples of ``name`` whose labels include ``labels`` (0 if none)."""
        from prometheus_client.parser import text_string_to_metric_families

        total = 0.0
        for fam in text_string_to_metric_families(self.client.get("/metrics").text):
            for s in fam.samples:
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                    total += float(s.value)
        return total

    def metric_samples(self, name: str) -> list[tuple[dict[str, str], float]]:
        from prometheus_client.parser import text_string_to_metric_families

        out = []
        for fam in text_string_to_metric_families(self.client.get("/metrics").text):
            out += [(dict(s.labels), float(s.value)) for s in fam.samples if s.name == name]
        return out

    def stop(self, timeout_s: float = 30.0) -> int:
        self.client.close()
        return stop_process(self.proc, timeout_s, kill_timeout_s=10.0)


def start_serve(
    store: Path, name: str, log_path: Path, *, wait_ready: bool = True, timeout_s: float = 90.0, **settings: object
) -> Proc:
    """Start ``python -m service.cli serve`` and (by default) wait until ``/v2/health/ready`` answers 200."""
    port = free_port()
    env = serve_env(store, name, port, **settings)
    with log_path.open("wb") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "serve"], cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT
        )
    served = Proc(proc, port, log_path)
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"mixinfer serve exited with {proc.returncode}: {served.log()[-2000:]}")
        with contextlib.suppress(httpx.HTTPError):
            status = served.client.get("/v2/health/ready", timeout=2.0).status_code
            if status == 200 or (not wait_ready and status == 503):
                return served
        if time.monotonic() > deadline:
            served.stop()
            raise AssertionError(f"mixinfer serve not ready within {timeout_s} s: {served.log()[-2000:]}")
        time.sleep(0.05)


@contextlib.contextmanager
def serving(store: Path, name: str, log_path: Path, **settings: object) -> Iterator[Proc]:
    served = start_serve(store, name, log_path, **settings)
    try:
        yield served
    finally:
        served.stop()


# --- a raw asyncio HTTP/1.1 client (keep-alive, bounded), for load -------------------------------------------------
def raw_post(host_port: str, path: str, body: bytes, content_type: str) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: {host_port}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode("latin-1") + body


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response with a Content-Length body (what uvicorn sends for these routes)."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return status, headers, body


@dataclass
class LoadResult:
    """Outcome of a closed-loop run: every request sent is counted in exactly one bucket."""

    sent: int = 0
    status: Counter[int] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    bad_bodies: int = 0
    elapsed_s: float = 0.0

    @property
    def answered(self) -> int:
        return sum(self.status.values())


async def closed_loop(
    host: str,
    port: int,
    requests: list[bytes],
    *,
    total: int,
    clients: int,
    time_limit_s: float,
    check_body: bool = True,
) -> LoadResult:
    """``clients`` keep-alive connections send ``total`` requests between them (cycling ``requests``), bounded by
    ``time_limit_s``; a request that gets no answer within the limit is counted as an error, never dropped."""
    result = LoadResult()
    next_index = 0
    t0 = time.perf_counter()
    deadline = t0 + time_limit_s

    async def worker() -> None:
        nonlocal next_index
        conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        while next_index < total and time.perf_counter() < deadline:
            i = next_index
            next_index += 1
            result.sent += 1
            try:
                if conn is None:
                    conn = await asyncio.open_connection(host, port)
                reader, writer = conn
                writer.write(requests[i % len(requests)])
                left = max(0.1, deadline - time.perf_counter())
                status, headers, body = await asyncio.wait_for(read_response(reader), timeout=left)
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError) as exc:
                result.errors[type(exc).__name__] += 1
                if conn is not None:
                    conn[1].close()
                conn = None
                continue
            result.status[status] += 1
            if check_body and status == 200 and not body.startswith(b'{"model"'):
                result.bad_bodies += 1
            if headers.get("connection", "").lower() == "close":
                conn[1].close()
                conn = None
        if conn is not None:
            conn[1].close()

    await asyncio.gather(*(worker() for _ in range(clients)))
    result.elapsed_s = time.perf_counter() - t0
    return result

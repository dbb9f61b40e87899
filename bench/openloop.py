"""A small, bounded open-loop HTTP load generator: requests arrive at a fixed rate whatever the server does.

wrk is closed-loop (a connection sends its next request only after the previous answer), which hides queueing
delay. Here request i is *scheduled* at ``t0 + i / rate`` (or at Poisson times) and its latency is measured from
that scheduled time, so time spent waiting for a free connection counts too (no coordinated omission). Requests go
over a pool of keep-alive HTTP/1.1 connections (at most ``max_conns``); the run is bounded by ``duration_s`` plus
``timeout_s`` for the stragglers, which are counted, never dropped silently.

Debian offers no fixed-rate tool (no wrk2, vegeta or oha; ``hey -q`` caps a closed loop), hence this file. Its own
CPU time is reported next to the figures (it shares the machine with the server).

Usage: ``python bench/openloop.py --url http://127.0.0.1:8000/predict --rate 200 --duration 5 FILE.png ...``
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":  # `python bench/x.py` puts bench/ first on sys.path, where bench/http.py would shadow
    sys.path[0] = str(Path(__file__).resolve().parent.parent)  # the standard library's http: use the repo root

import argparse
import asyncio
import contextlib
import json
import time
import urllib.parse
from collections import Counter
from dataclasses import asdict, dataclass, field

import numpy as np


@dataclass
class OpenLoopResult:
    """What one fixed-rate run measured (latencies in milliseconds, from the scheduled arrival time)."""

    offered_rps: float
    duration_s: float
    scheduled: int
    completed: int
    achieved_rps: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float
    status: dict[str, int] = field(default_factory=dict)
    errors: int = 0
    timed_out: int = 0
    max_conns_used: int = 0
    client_cpu_s: float = 0.0


class _Conn:
    """One keep-alive HTTP/1.1 connection that sends a prepared request and reads one response."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def roundtrip(self, request: bytes) -> tuple[int, bool]:
        """Send ``request``; returns (status, keep_alive)."""
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        length = 0
        keep_alive = True
        chunked = False
        for line in lines[1:]:
            name, _, value = line.partition(":")
            name = name.strip().lower()
            if name == "content-length":
                length = int(value.strip())
            elif name == "connection" and value.strip().lower() == "close":
                keep_alive = False
            elif name == "transfer-encoding" and "chunked" in value.lower():
                chunked = True
        if chunked:
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).strip().split(b";")[0], 16)
                await self.reader.readexactly(size + 2)
                if size == 0:
                    break
        elif length:
            await self.reader.readexactly(length)
        return status, keep_alive

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()


def build_request(url: str, body: bytes, content_type: str) -> bytes:
    """The raw bytes of one ``POST url`` with ``body``."""
    parts = urllib.parse.urlsplit(url)
    path = parts.path or "/"
    return (
        f"POST {path} HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode("latin-1") + body


async def _run(
    url: str,
    requests: list[bytes],
    rate: float,
    duration_s: float,
    *,
    max_conns: int,
    timeout_s: float,
    poisson: bool,
    seed: int,
) -> OpenLoopResult:
    parts = urllib.parse.urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    loop = asyncio.get_running_loop()
    n = max(1, int(rate * duration_s))
    rng = np.random.default_rng(seed)
    gaps = rng.exponential(1.0 / rate, size=n) if poisson else np.full(n, 1.0 / rate)
    offsets = np.concatenate([[0.0], np.cumsum(gaps[:-1])])
    idle: list[_Conn] = []
    slots = asyncio.Semaphore(max_conns)  # requests in flight <= max_conns, so connections <= max_conns
    in_use = 0
    max_used = 0
    latencies = np.full(n, np.nan)
    status_counts: Counter[str] = Counter()
    errors = 0

    async def one(i: int, scheduled: float) -> None:
        nonlocal errors, in_use, max_used
        async with slots:
            in_use += 1
            max_used = max(max_used, in_use)
            conn = idle.pop() if idle else None
            try:
                if conn is None:
                    conn = _Conn(*await asyncio.open_connection(host, port))
                status, keep = await conn.roundtrip(requests[i % len(requests)])
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError, IndexError):
                errors += 1
                if conn is not None:
                    conn.close()
                return
            finally:
                in_use -= 1
            latencies[i] = time.perf_counter() - scheduled
            status_counts[str(status)] += 1
            if keep:
                idle.append(conn)
            else:
                conn.close()

    cpu0 = time.process_time()
    # perf_counter, not loop.time(): uvloop's loop clock has millisecond resolution and is cached per iteration
    t0 = time.perf_counter() + 0.05
    tasks = []
    for i in range(n):
        due = t0 + offsets[i]
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(loop.create_task(one(i, due)))
    _, pending = await asyncio.wait(tasks, timeout=timeout_s)
    for task in pending:
        task.cancel()
    t_end = time.perf_counter()
    cpu = time.process_time() - cpu0
    for conn in idle:
        conn.close()
    done_lat = latencies[np.isfinite(latencies)]
    completed = int(done_lat.size)
    # throughput over the scheduling window plus the time the last answer took
    window = max(offsets[-1] + (float(np.nanmax(latencies)) if completed else 0.0), 1e-9)
    q = np.percentile(done_lat, [50, 95, 99]) * 1000 if completed else [float("nan")] * 3
    return OpenLoopResult(
        offered_rps=rate,
        duration_s=round(t_end - t0, 3),
        scheduled=n,
        completed=completed,
        achieved_rps=completed / window,
        p50_ms=float(q[0]),
        p95_ms=float(q[1]),
        p99_ms=float(q[2]),
        max_ms=float(done_lat.max() * 1000) if completed else float("nan"),
        status=dict(status_counts),
        errors=errors,
        timed_out=len(pending),
        max_conns_used=max_used,
        client_cpu_s=round(cpu, 3),
    )


def open_loop(
    url: str,
    bodies: list[bytes],
    rate: float,
    duration_s: float,
    *,
    content_type: str = "image/png",
    max_conns: int = 256,
    timeout_s: float = 15.0,
    poisson: bool = False,
    seed: int = 0,
) -> OpenLoopResult:
    """Send ``rate * duration_s`` POSTs (bodies cycled) at fixed (or Poisson) arrival times; bounded in time."""
    if rate <= 0 or duration_s <= 0:
        raise ValueError(f"rate and duration must be > 0, got {rate} and {duration_s}")
    requests = [build_request(url, b, content_type) for b in bodies]
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is in the serve extra
        runner = asyncio.run
    return runner(
        _run(url, requests, rate, duration_s, max_conns=max_conns, timeout_s=timeout_s, poisson=poisson, seed=seed)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--rate", type=float, required=True, help="arrivals per second")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds of arrivals")
    parser.add_argument("--max-conns", type=int, default=256)
    parser.add_argument("--poisson", action="store_true", help="exponential inter-arrival times (default: fixed)")
    parser.add_argument("--content-type", default="image/png")
    parser.add_argument("files", nargs="+", type=Path)
    args = parser.parse_args()
    res = open_loop(
        args.url,
        [p.read_bytes() for p in args.files],
        args.rate,
        args.duration,
        content_type=args.content_type,
        max_conns=args.max_conns,
        poisson=args.poisson,
    )
    print(json.dumps(asdict(res)))


if __name__ == "__main__":
    main()

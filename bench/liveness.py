"""Liveness latency with and without decode-heavy clients, side by side: does decoding stall the event loop?

Starts ``mixinfer serve`` (the default bundle, CPU provider) on a free loopback port and probes
``GET /v2/health/live`` every ``--probe-interval-ms`` over one keep-alive connection, in alternating windows:

- ``quiet``: the probes only;
- ``png``: plus ``--clients`` closed-loop clients, each posting a 4096x4096 grey PNG (~25 KB encoded, 16.7 Mpx,
  ~0.1 s of decoding) to ``/predict`` again as soon as it is answered;
- ``json``: plus as many clients posting 256 JSON array instances (``?mode=off``: the conversion, not the engine).

Windows alternate (quiet, png, json, quiet, ...) ``--rounds`` times so that a busy shared machine weighs on all
alike. The figure is p99 of the probe latency with heavy clients over p99 quiet (target: <= 10).

Usage::

    .venv/bin/python bench/liveness.py [--seconds 3] [--rounds 3] [--clients 4] [--json]

With ``--json`` the last stdout line is one JSON object with every figure.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":  # `python bench/x.py` puts bench/ first on sys.path, where bench/http.py would shadow
    sys.path[0] = str(Path(__file__).resolve().parent.parent)  # the standard library's http: use the repo root

import argparse
import asyncio
import io
import json
import time
from collections import Counter
from typing import Any

import numpy as np

from bench.common import ROOT, emit_json, fmt, free_port, log, machine_info, running

TARGET_RATIO = 10.0
SIDE = 4096


def big_png() -> bytes:
    """A 4096x4096 grey PNG of stripes: small encoded, 16.7 Mpx decoded."""
    from PIL import Image

    row = ((np.arange(SIDE) // 64) % 2 * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(np.broadcast_to(row, (SIDE, SIDE)).copy(), "L").save(buf, "PNG")
    return buf.getvalue()


def json_body(shape: tuple[int, int, int], images: int = 256) -> bytes:
    values = np.random.default_rng(0).random((images, *shape)).round(4)
    return json.dumps({"instances": values.tolist()}).encode()


def request(port: int, method: str, path: str, body: bytes = b"", content_type: str = "") -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
    if body:
        head += f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
    return (head + "\r\n").encode("latin-1") + body


async def read_response(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    length = next((int(v) for k, _, v in (x.partition(":") for x in lines[1:]) if k.lower() == "content-length"), 0)
    await reader.readexactly(length)
    return int(lines[0].split(" ", 2)[1])


async def window(port: int, heavy: bytes | None, clients: int, seconds: float, interval_s: float) -> dict[str, Any]:
    """Probe for ``seconds`` while ``clients`` send ``heavy`` in closed loops; latencies in ms."""
    stop = asyncio.Event()
    statuses: Counter[int] = Counter()

    async def heavy_client() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while not stop.is_set():
                writer.write(heavy or b"")
                statuses[await read_response(reader)] += 1
        finally:
            writer.close()

    tasks = [asyncio.ensure_future(heavy_client()) for _ in range(clients if heavy else 0)]
    await asyncio.sleep(0.2 if heavy else 0.0)  # the heavy clients are under way
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    probe = request(port, "GET", "/v2/health/live")
    latencies: list[float] = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        writer.write(probe)
        assert await read_response(reader) == 200
        latencies.append((time.perf_counter() - t0) * 1e3)
        await asyncio.sleep(max(0.0, interval_s - (time.perf_counter() - t0)))
    writer.close()
    stop.set()
    await asyncio.wait_for(asyncio.gather(*tasks), timeout=60)
    return {"latencies": latencies, "heavy_status": dict(statuses)}


def summary(latencies: list[float]) -> dict[str, float]:
    arr = np.asarray(latencies)
    return {
        "probes": int(arr.size),
        "p50_ms": float(np.percentile(arr, 50)),
        "p99_ms": float(np.percentile(arr, 99)),
        "max_ms": float(arr.max()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", default="model_store/mnist-mixup", help="store/<name> directory")
    parser.add_argument("--seconds", type=float, default=3.0, help="length of one window")
    parser.add_argument("--rounds", type=int, default=3, help="quiet/png/json windows, alternating")
    parser.add_argument("--clients", type=int, default=4, help="decode-heavy clients in a loaded window")
    parser.add_argument("--probe-interval-ms", type=float, default=5.0)
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last stdout line")
    args = parser.parse_args()

    bundle = (ROOT / args.bundle).resolve()
    shape = tuple(json.loads(next(bundle.glob("*/manifest.json")).read_text())["input"]["shape"])
    port = free_port()
    env = {
        "MIXINFER_MODEL_DIR": str(bundle.parent),
        "MIXINFER_MODEL_NAME": bundle.name,
        "MIXINFER_PORT": str(port),
        "MIXINFER_PROVIDERS": "CPUExecutionProvider",
        "MIXINFER_ALLOW_MODE_OVERRIDE": "true",
        "MIXINFER_LOG_JSON": "false",
    }
    heavy = {
        "png": request(port, "POST", "/predict", big_png(), "image/png"),
        "json": request(port, "POST", "/predict?mode=off", json_body(shape), "application/json"),  # type: ignore[arg-type]
    }
    info = machine_info()
    log("machine: %s cores, load average %.2f (at start)", info["cores"], info["load_avg_1m"])
    latencies: dict[str, list[float]] = {"quiet": [], "png": [], "json": []}
    heavy_status: dict[str, Counter[int]] = {"png": Counter(), "json": Counter()}
    cmd = [sys.executable, "-m", "service.cli", "serve"]
    with running("liveness-mixinfer", cmd, port=port, ready_path="/v2/health/ready", env=env):
        for r in range(args.rounds):
            for name in ("quiet", "png", "json"):
                out = asyncio.run(
                    window(port, heavy.get(name), args.clients, args.seconds, args.probe_interval_ms / 1e3)
                )
                latencies[name] += out["latencies"]
                if name in heavy_status:
                    heavy_status[name].update(out["heavy_status"])
                log("round %d %-5s p99 %.2f ms", r + 1, name, summary(out["latencies"])["p99_ms"])
    figures = {name: summary(values) for name, values in latencies.items()}
    quiet_p99 = figures["quiet"]["p99_ms"]
    ratios = {name: figures[name]["p99_ms"] / quiet_p99 for name in ("png", "json")}
    print(f"# Liveness p99 with decode-heavy clients ({args.clients} clients, {args.rounds} x {args.seconds:g} s each)")
    print(f"load average at start: {info['load_avg_1m']} on {info['cores']} cores\n")
    print("| window | probes | p50 ms | p99 ms | max ms | p99 / quiet | heavy answers |")
    print("|---|---|---|---|---|---|---|")
    for name, fig in figures.items():
        ratio = fmt(ratios.get(name), 2) if name in ratios else "1"
        answered = dict(heavy_status[name]) if name in heavy_status else "–"
        print(
            f"| {name} | {fig['probes']} | {fmt(fig['p50_ms'], 2)} | {fmt(fig['p99_ms'], 2)} | "
            f"{fmt(fig['max_ms'], 2)} | {ratio} | {answered} |"
        )
    worst = max(ratios.values())
    print(f"\nworst p99 ratio {worst:.2f} (target <= {TARGET_RATIO:g}): {'met' if worst <= TARGET_RATIO else 'MISSED'}")
    if args.json:
        emit_json(
            {
                "machine": info,
                "clients": args.clients,
                "windows": figures,
                "p99_ratio": ratios,
                "worst_p99_ratio": worst,
                "target_ratio": TARGET_RATIO,
                "met": worst <= TARGET_RATIO,
                "heavy_status": {k: dict(v) for k, v in heavy_status.items()},
            }
        )


if __name__ == "__main__":
    main()

"""Where a request's CPU goes in the real server: ``mixinfer serve`` under ``wrk`` load, sampled by ``py-spy``.

Starts mixinfer on the default bundle, drives it with ``wrk`` (32 connections, single-image PNG bodies) and records
py-spy samples of every thread (idle excluded, so the samples are CPU time; native frames of ONNX Runtime count under
the Python call that made them). Each sample is put in the category of the innermost frame that names one (walking
from the leaf outwards): the engine (``service/mi``, ``service/backends``, ONNX Runtime), decode, validation and
request parsing, batching, JSON encode, metrics, query watch, access log and middleware, the HTTP framework
(uvicorn, starlette, fastapi), the event loop itself; the rest is ``other``. Prints a table of shares and, with
``--json``, one JSON object as the last stdout line. Needs ``py-spy`` (dev extra) and ``wrk``; py-spy must be
allowed to read the server's memory (root, or ``kernel.yama.ptrace_scope`` 0).

Usage: ``python bench/profile.py [--seconds 10] [--connections 32] [--json]``
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":  # `python bench/x.py` puts bench/ first on sys.path, where bench/http.py would shadow
    sys.path[0] = str(Path(__file__).resolve().parent.parent)  # the standard library's http: use the repo root

import argparse
import shutil
import subprocess
import threading
from collections import Counter

from bench.common import CACHE_DIR, emit_json, log, machine_info
from bench.http import DEFAULT_NAME, DEFAULT_STORE, default_bundle, start, wrk

#: (category, substrings of a frame's file or function), tried in this order on each frame from the leaf outwards
CATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("engine: MI + ONNX Runtime", ("service/mi/", "service/backends/", "onnxruntime")),
    ("decode", ("service/preprocess.py", "PIL/")),
    ("query watch", ("service/api/query_watch.py", "service/watch/")),
    ("batching", ("service/batching.py",)),
    ("metrics", ("service/metrics.py", "prometheus_client", "service/api/stats.py")),
    ("JSON encode / response", ("service/api/responses.py", "service/api/detail.py", "orjson", "json/")),
    ("access log + middleware", ("service/api/middleware.py", "service/api/logs.py", "logging/")),
    ("validation / request parsing", ("service/api/inputs.py", "service/api/deps.py", "service/api/schemas.py",
                                      "service/api/identity.py", "pydantic")),
    ("route + inference glue", ("service/api/",)),
    ("HTTP framework", ("uvicorn/", "starlette/", "fastapi/", "httptools")),
    ("event loop + threads", ("asyncio/", "uvloop", "concurrent/futures", "threading.py", "selectors.py")),
)  # fmt: skip


def category(stack: str) -> str:
    frames = stack.split(";")
    for frame in reversed(frames):
        for name, needles in CATEGORIES:
            if any(n in frame for n in needles):
                return name
    return "other"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="sampled seconds of load")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    parser.add_argument("--store", type=Path, default=DEFAULT_STORE)
    parser.add_argument("--name", default=DEFAULT_NAME)
    parser.add_argument("--threads", type=int, default=None, help="MIXINFER_INTRA_OP_THREADS (default: unset)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    b = default_bundle(args)
    raw = CACHE_DIR / "profile.txt"
    server = start("mixinfer", b, args.threads, name="profile-mixinfer")
    try:
        wrk(server, b, args.connections, 2.0)  # warm-up
        load: dict[str, object] = {}
        t = threading.Thread(target=lambda: load.update(wrk(server, b, args.connections, args.seconds + 2)))
        t.start()
        subprocess.run(
            [pyspy, "record", "-p", str(server.pid), "-d", str(round(args.seconds)), "-r", str(args.rate),
             "--format", "raw", "-o", str(raw), "--nonblocking"],
            check=True, capture_output=True, timeout=args.seconds + 60,
        )  # fmt: skip
        t.join()
    finally:
        server.stop()
    counts: Counter[str] = Counter()
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if stack:
            counts[category(stack)] += int(n)
    total = sum(counts.values())
    shares = {k: v / total for k, v in counts.most_common()}
    requests = int(load.get("requests", 0))  # type: ignore[call-overload]
    print(f"| category | share of sampled CPU | ({total} samples, {requests} requests, {args.connections} clients) |")
    print("|---|---|---|")
    for k, v in shares.items():
        print(f"| {k} | {100 * v:.1f} % | |")
    log("raw samples in %s", raw)
    if args.json:
        emit_json({"shares": shares, "samples": total, "requests": requests, "machine": machine_info()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

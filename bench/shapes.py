"""What a change of input shape costs a backend session, with static shapes off and on (the GPU check).

ONNX Runtime's CUDA convolutions re-plan when a session's input shape changes; a micro-batching server changes
shape on almost every call. For each bundle and each ``static_shapes`` setting this measures, in one process:

- ``steady_ms``: one fused/host mix call of 64 images x N_PL blends, the same shape every time;
- ``alternating_ms``: a pair of mix calls that alternate N_PL and N_OL blends (16 images), as PL then OL do;
- ``engine_img_s``: MI-Combined on batches of varied sizes (64, 48, 33, 64, 17, 64, 40), as the batcher makes them.

Usage::

    .venv/bin/python bench/shapes.py --providers CUDAExecutionProvider,CPUExecutionProvider [--bundle B ...] --json

On the CPU provider the two settings should read alike; on CUDA, ``static`` should keep ``alternating_ms`` near
two steady calls. With ``--json`` the last stdout line is one JSON object: ``{bundle: {off|on: figures}}``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

if __name__ == "__main__":  # `python bench/x.py` puts bench/ first on sys.path, where bench/http.py would shadow
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from bench.common import emit_json, log, machine_info, served_bundle
from bench.engine import rate
from service.mi.engine import MIEngine
from service.mi.params import Mode
from service.store import load_bundle, open_backend

VARIED_BATCHES = (64, 48, 33, 64, 17, 64, 40)


def per_call_ms(fn: Callable[[], object], seconds: float) -> float:
    """Mean wall time of ``fn`` in ms over at least ``seconds`` (after two warm calls)."""
    fn()
    fn()
    return 1e3 / rate(fn, 1, seconds)


def measure(path: Path, providers: str, static: str, seconds: float) -> dict[str, Any]:
    bundle = load_bundle(path)
    p = bundle.manifest.mi
    backend = open_backend(bundle, providers=providers, static_shapes=static)  # type: ignore[arg-type]
    engine = MIEngine(backend, bundle.pool_labels, p, seed=0)
    engine.warmup((1, max(VARIED_BATCHES)))
    rng = np.random.default_rng(0)
    x = rng.random((64, *bundle.manifest.input.shape), dtype=np.float32)
    pool = bundle.pool_images.shape[0]
    pl, ol = rng.integers(0, pool, size=(64, p.n_pl)), rng.integers(0, pool, size=(16, p.ol_combined.n))
    steady = per_call_ms(lambda: backend.mean_mix_probs(x, pl, p.lam_pl), seconds)
    alternating = per_call_ms(
        lambda: (backend.mean_mix_probs(x[:16], pl[:16], p.lam_pl), backend.mean_mix_probs(x[:16], ol, 0.4)), seconds
    )
    batches = [x[:b] for b in VARIED_BATCHES]
    i = iter(range(1 << 62))
    call_ms = per_call_ms(lambda: engine(batches[next(i) % len(batches)], Mode.COMBINED), seconds)
    return {
        "provider": backend.provider,
        "mixing": backend.mixing,
        "static_shapes": backend.static_shapes,
        "sessions": len(backend.static_sessions),
        "steady_ms": steady,
        "alternating_ms": alternating,
        "engine_img_s": float(np.mean(VARIED_BATCHES)) / call_ms * 1e3,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--bundle", type=Path, nargs="+", default=None, help="bundle directories (default: the served one)"
    )
    parser.add_argument("--providers", default="CPUExecutionProvider", help="ONNX Runtime providers, in order")
    parser.add_argument("--seconds", type=float, default=1.0, help="time per measurement")
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last stdout line")
    args = parser.parse_args(argv)
    args.bundle = args.bundle or [served_bundle()]

    result: dict[str, Any] = {"machine": machine_info()}
    print("| bundle | provider | static shapes | sessions | steady call ms | alternating pair ms | engine img/s |")
    print("|---|---|---|---|---|---|---|")
    for path in args.bundle:
        result[str(path)] = {}
        for static in ("off", "on"):
            log("%s, static shapes %s", path, static)
            r = measure(path, args.providers, static, args.seconds)
            result[str(path)][static] = r
            print(
                f"| {path} | {r['provider']} | {static} | {r['sessions']} | {r['steady_ms']:.2f} | "
                f"{r['alternating_ms']:.2f} | {r['engine_img_s']:.0f} |"
            )
    if args.json:
        emit_json(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

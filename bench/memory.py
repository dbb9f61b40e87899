"""Memory of the served engine against one plain ONNX Runtime session: device memory on CUDA, RSS on the CPU.

Each measurement runs in a fresh child process: ``engine`` opens the bundle as ``mixinfer serve`` does (default
settings: static-shape sessions on GPU providers, warm-up at batch 1 and ``MIXINFER_MAX_BATCH_IMAGES``), ``session``
opens one plain ``InferenceSession`` on the same model bytes and runs it once on ``MAX_BATCH_IMAGES x N_PL`` rows.
The figure is ``engine_over_one_session`` (the issue's target on the GPU: <= 1.5). Device memory is the process's
``used_memory`` from ``nvidia-smi``; on the CPU provider it is the RSS growth over the process before the bundle.

Usage: ``python bench/memory.py --providers CUDAExecutionProvider,CPUExecutionProvider --bundle B [B ...] --json``
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":  # `python bench/x.py` puts bench/ first on sys.path, where bench/http.py would shadow
    sys.path[0] = str(Path(__file__).resolve().parent.parent)  # the standard library's http: use the repo root

import argparse
import json
import os
import subprocess
from typing import Any

import numpy as np

from bench.common import emit_json, log, machine_info, rss_mib, served_bundle

RESNET_BUNDLE = Path("runs/bench/store/resnet18-bench/1")


def used_mib(providers: str) -> float:
    """This process's device memory (MiB, nvidia-smi) on CUDA, else its RSS."""
    if not providers.startswith("CUDA"):
        return rss_mib(os.getpid())
    out = subprocess.run(
        ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
        capture_output=True, text=True, check=True, timeout=30,
    ).stdout  # fmt: skip
    return sum(float(used) for pid, used in (line.split(",") for line in out.splitlines()) if int(pid) == os.getpid())


def child(kind: str, bundle_dir: Path, providers: str) -> dict[str, float]:
    import onnxruntime as ort

    from service.config import Settings
    from service.mi.engine import MIEngine
    from service.store import load_bundle, open_backend

    settings = Settings()
    bundle = load_bundle(bundle_dir)
    base = 0.0 if providers.startswith("CUDA") else used_mib(providers)
    rows = settings.max_batch_images
    if kind == "engine":
        backend = open_backend(bundle, providers=providers.split(","), static_shapes=settings.static_shapes)
        engine = MIEngine(backend, bundle.pool_labels, bundle.manifest.mi)
        engine.warmup(tuple(sorted({1, rows})))
        engine(np.zeros((rows, *bundle.manifest.input.shape), dtype=np.float32))
        sessions = len(getattr(backend, "static_sessions", ())) or 1
    else:
        session = ort.InferenceSession(bundle.model_bytes, providers=providers.split(","))
        spec = bundle.manifest.input
        x = np.zeros((rows * bundle.manifest.mi.n_pl, *spec.shape), dtype=np.float32)
        session.run(None, {spec.name: x})
        sessions = 1
    return {"mib": used_mib(providers) - base, "sessions": sessions}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--bundle",
        type=Path,
        nargs="+",
        default=None,
        help="bundle directories (default: the served one and the ResNet-18 bench bundle)",
    )
    parser.add_argument("--providers", default="CPUExecutionProvider")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--child", choices=["engine", "session"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.bundle = args.bundle or [served_bundle(), RESNET_BUNDLE]
    if args.child:
        print(json.dumps(child(args.child, args.bundle[0], args.providers)))
        return 0
    result: dict[str, Any] = {"machine": machine_info(), "providers": args.providers}
    print("| bundle | engine MiB | sessions | one session MiB | engine / one session |\n|---|---|---|---|---|")
    for path in args.bundle:
        got = {}
        for kind in ("engine", "session"):
            cmd = [sys.executable, __file__, "--child", kind, "--bundle", str(path), "--providers", args.providers]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=300).stdout
            got[kind] = json.loads(out.strip().splitlines()[-1])
        ratio = got["engine"]["mib"] / got["session"]["mib"] if got["session"]["mib"] > 0 else float("nan")
        result[str(path)] = {**got, "engine_over_one_session": ratio}
        log("%s: %s", path, result[str(path)])
        print(f"| {path} | {got['engine']['mib']:.0f} | {got['engine']['sessions']} | {got['session']['mib']:.0f} | "
              f"{ratio:.2f} |")  # fmt: skip
    if args.json:
        emit_json(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

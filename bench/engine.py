"""Benchmark of the MI engine against the reference-style implementation and the compute floor.

Measured in one process on the same weights and threads:

- ``reference``: the P2333/Mixup-Inference style: PyTorch eager, batch size 1, one forward per blend, MI-PL and
  MI-OL always both computed (1 + N_PL + N_OL forwards per image); :func:`service.mi.reference.reference_mi`.
- ``onnx_loop``: the same per-image loop over the ONNX backend (separates backend gains from batching gains).
- ``engine``: :class:`service.mi.engine.MIEngine` (MI-Combined) at batch 1, 16, 64, 256, on clean inputs (the
  model's own flag rate) and on all-flagged inputs (threshold forced below every gap: 1 + N_PL + N_OL per image).
- ``floor``: plain throughput / (1 + N_PL + flag_rate * N_OL), plain throughput measured at the engine's mix-call
  batch size (B * N_PL), interleaved with the engine runs, median of the repeats.

Usage::

    .venv/bin/python bench/engine.py [--bundle DIR (default: the served bundle)] [--threads 2] [--json]

Progress goes to stderr; the table (markdown) to stdout; with ``--json`` the last stdout line is one JSON object
with ``engine_vs_reference`` and ``engine_vs_floor`` (batch 64, clean inputs) among its keys. Without the default
bundle, a randomly initialised ``mnist_cnn`` (the default bundle's architecture, same size) and a synthetic pool
(100 images per class) are used, and the output says so.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
# the script's own directory comes first on sys.path, and bench/http.py would shadow the standard library's http
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(REPO))

from bench.common import served_bundle  # noqa: E402
from service.backends.onnx import OrtBackend  # noqa: E402
from service.mi.engine import MIEngine  # noqa: E402
from service.mi.params import MIParams, Mode  # noqa: E402
from service.mi.reference import reference_mi  # noqa: E402

LOGGER = logging.getLogger("bench.engine")


def log(msg: str, *args: object) -> None:
    print(msg % args if args else msg, file=sys.stderr, flush=True)


class Setup:
    """Everything one benchmark run needs: model path, torch module, pool, params, clean inputs."""

    def __init__(self, bundle: Path, tmp: Path) -> None:
        import torch

        if (bundle / "manifest.json").is_file():
            from service.store import load_bundle
            from service.training.models import load_bundle_model

            b = load_bundle(bundle, require_weights=True)
            self.source = f"bundle {bundle.relative_to(REPO) if bundle.is_relative_to(REPO) else bundle}"
            self.model_bytes = b.model_bytes
            self.torch_model = load_bundle_model(b)
            self.pool_images, self.pool_labels = b.pool_images, b.pool_labels
            self.params = b.manifest.mi
            self.arch = b.manifest.architecture
        else:
            from service.training.export import export_onnx
            from service.training.models import build_model

            torch.manual_seed(0)
            self.torch_model = build_model("mnist_cnn", 10, 1).eval()
            export_onnx(self.torch_model, tmp / "model.onnx", (1, 28, 28))
            self.model_bytes = (tmp / "model.onnx").read_bytes()
            rng = np.random.default_rng(0)
            self.pool_labels = np.repeat(np.arange(10, dtype=np.int64), 100)
            self.pool_images = rng.integers(0, 256, size=(1000, 1, 28, 28), dtype=np.uint8)
            self.params = MIParams()
            self.arch = "mnist_cnn"
            self.source = f"FALLBACK: random-init mnist_cnn + synthetic pool ({bundle} not found)"
        # clean inputs: the bundle's held-out test split when its dataset is available offline (mnist5k is),
        # else the pool images (clean and in-distribution, but seen in training: the flag rate is then optimistic)
        self.inputs = self.pool_images.astype(np.float32) / np.float32(255.0)
        self.inputs_from = "pool images"
        if (bundle / "manifest.json").is_file():
            try:
                from service.training.datasets import DatasetError, load_dataset

                ds = load_dataset(b.manifest.dataset.name)
                if ds.sha256 == b.manifest.dataset.sha256:
                    self.inputs = ds.images[b.splits["test"]].astype(np.float32) / np.float32(255.0)
                    self.inputs_from = f"{len(self.inputs)} test-split images of {ds.name}"
            except (DatasetError, OSError) as exc:
                log("dataset %s not available (%s): using pool images as clean inputs", b.manifest.dataset.name, exc)


def rate(fn: Callable[[], object], n_images: int, min_seconds: float) -> float:
    """Images per second of ``fn`` (which processes ``n_images``), repeated until ``min_seconds`` have passed."""
    done, start = 0, time.perf_counter()
    while True:
        fn()
        done += n_images
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return done / elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, default=None, help="bundle directory (default: the served one)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="ORT intra-op and torch threads")
    parser.add_argument("--batches", default="1,16,64,256", help="engine batch sizes (comma-separated)")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved repeats per measurement (median)")
    parser.add_argument("--min-seconds", type=float, default=0.4, help="minimum time per repeat")
    parser.add_argument("--reference-images", type=int, default=24, help="images through the per-image loops")
    parser.add_argument("--mixing", default="auto", choices=["auto", "host", "fused"])
    parser.add_argument(
        "--providers",
        default="CPUExecutionProvider",
        help="ONNX Runtime providers of the engine and the floor, in order (e.g. CUDAExecutionProvider)",
    )
    parser.add_argument("--torch-device", default="cpu", help="device of the reference-style torch loop (cpu, cuda)")
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last stdout line")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")]
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        s = Setup(args.bundle or served_bundle(), Path(tmp))
        p = s.params
        log("source: %s; clean inputs: %s; params: %s", s.source, s.inputs_from, p.model_dump())
        backend = OrtBackend(
            s.model_bytes,
            s.pool_images,
            providers=args.providers,
            mixing=args.mixing,
            intra_op_threads=args.threads,
            inter_op_threads=1,
        )
        engine = MIEngine(backend, s.pool_labels, p, seed=0)
        forced = MIEngine(backend, s.pool_labels, p.model_copy(update={"threshold": -2.0}), seed=0)  # all flagged
        engine.warmup(tuple(batches))
        rng = np.random.default_rng(1)

        def pick(n: int) -> np.ndarray:
            return s.inputs[rng.integers(0, len(s.inputs), size=n)]

        # --- per-image loops (both branches always, as the reference code) ----------------------------------------
        xr = pick(args.reference_images)

        torch_model = s.torch_model.to(args.torch_device)

        def torch_logits(x: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                return torch_model(torch.from_numpy(x).to(args.torch_device)).cpu().numpy()

        def ref_torch() -> object:
            return reference_mi(
                torch_logits, s.pool_images, s.pool_labels, p, xr, mode=Mode.COMBINED, rng=rng, both_branches=True
            )

        def ref_onnx() -> object:
            return reference_mi(
                backend.logits, s.pool_images, s.pool_labels, p, xr, mode=Mode.COMBINED, rng=rng, both_branches=True
            )

        # Per batch size: several different clean batches, cycled, so the flag rate is the inputs' own; the floor
        # uses the flag rate of exactly these batches.
        clean_sets = {b: [pick(b) for _ in range(max(2, 512 // b))] for b in batches}
        mix_sets = {b: np.ascontiguousarray(pick(b * p.n_pl)) for b in batches}
        flag_rates = {b: float(np.mean([engine(x).flagged.mean() for x in xs])) for b, xs in clean_sets.items()}

        def cycle(fn: Callable[[np.ndarray], object], xs: list[np.ndarray]) -> Callable[[], object]:
            it = iter(range(1 << 62))
            return lambda: fn(xs[next(it) % len(xs)])

        # Everything is interleaved, repeat by repeat, so a change in machine load hits all rows alike.
        # torch at batch 1 is often faster on one thread than on several (nothing to share, busy machine):
        # the reference gets its best thread count, so the ratio is not inflated.
        ref_by_threads: dict[int, list[float]] = {t: [] for t in sorted({1, args.threads})}
        loop_rates: list[float] = []
        series: dict[int, dict[str, list[float]]] = {b: {"plain": [], "clean": [], "flagged": []} for b in batches}
        for r in range(args.repeats):
            for t, rates in ref_by_threads.items():
                torch.set_num_threads(t)
                rates.append(rate(ref_torch, len(xr), args.min_seconds))
            torch.set_num_threads(args.threads)
            loop_rates.append(rate(ref_onnx, len(xr), args.min_seconds))
            for b in batches:
                mb = mix_sets[b]
                series[b]["plain"].append(rate(lambda mb=mb: backend.logits(mb), len(mb), args.min_seconds))
                series[b]["clean"].append(rate(cycle(engine, clean_sets[b]), b, args.min_seconds))
                series[b]["flagged"].append(rate(cycle(forced, clean_sets[b]), b, args.min_seconds))
            log(
                "repeat %d: reference %s img/s, onnx loop %.1f img/s, engine clean %s",
                r,
                {t: round(v[-1], 1) for t, v in ref_by_threads.items()},
                loop_rates[-1],
                {b: round(series[b]["clean"][-1]) for b in batches},
            )
        ref_threads, reference = max(
            ((t, statistics.median(v)) for t, v in ref_by_threads.items()), key=lambda tv: tv[1]
        )
        onnx_loop = statistics.median(loop_rates)

        rows: dict[int, dict[str, float]] = {}
        for b in batches:
            plain_rate = statistics.median(series[b]["plain"])
            clean_rate = statistics.median(series[b]["clean"])
            flagged_rate = statistics.median(series[b]["flagged"])
            floor = plain_rate / (1 + p.n_pl + flag_rates[b] * p.ol_combined.n)
            floor_flagged = plain_rate / (1 + p.n_pl + p.ol_combined.n)
            rows[b] = {
                "engine_clean": clean_rate,
                "engine_all_flagged": flagged_rate,
                "flag_rate_clean": flag_rates[b],
                "plain_at_mix_batch": plain_rate,
                "floor_clean": floor,
                "floor_all_flagged": floor_flagged,
                "vs_floor_clean": clean_rate / floor,
                "vs_floor_all_flagged": flagged_rate / floor_flagged,
            }
            log("batch %d: %s", b, {k: round(v, 3) for k, v in rows[b].items()})

    key = 64 if 64 in rows else batches[-1]
    result: dict[str, Any] = {
        "source": s.source,
        "clean_inputs": s.inputs_from,
        "architecture": s.arch,
        "mixing": backend.mixing,
        "provider": backend.provider,
        "threads": args.threads,
        "reference_device": args.torch_device,
        "machine": f"{platform.machine()} {os.cpu_count()} cores (shared; figures are noisy)",
        "params": {"n_pl": p.n_pl, "n_ol": p.ol_combined.n, "threshold": p.threshold},
        "reference_img_s": reference,
        "reference_threads": ref_threads,
        "onnx_loop_img_s": onnx_loop,
        "engine": {str(b): v for b, v in rows.items()},
        "engine_vs_reference": rows[key]["engine_clean"] / reference,
        "engine_vs_floor": rows[key]["vs_floor_clean"],
        "batch_for_ratios": key,
        "seconds": time.perf_counter() - t_start,
    }

    print(f"Source: {s.source}; provider {backend.provider}, mixing {backend.mixing}, {args.threads} threads")
    print(f"Clean inputs: {s.inputs_from}; N_PL={p.n_pl}, N_OL={p.ol_combined.n}, threshold={p.threshold}")
    print(f"Median of {args.repeats} interleaved repeats\n")
    print("| implementation | batch | img/s clean | img/s all flagged | flag rate | floor (clean) | vs floor |")
    print("|---|---|---|---|---|---|---|")
    print(
        f"| reference-style (torch eager on {args.torch_device}, per image, both branches, {ref_threads} thread(s)) "
        f"| 1 | {reference:.1f} | "
        f"{reference:.1f} | - | - | - |"
    )
    print(
        f"| per-image loop over the ONNX backend, both branches | 1 | {onnx_loop:.0f} | {onnx_loop:.0f} | - | - | - |"
    )
    for b, r in rows.items():
        print(
            f"| MIEngine (Combined) | {b} | {r['engine_clean']:.0f} | {r['engine_all_flagged']:.0f} | "
            f"{r['flag_rate_clean']:.3f} | {r['floor_clean']:.0f} | {r['vs_floor_clean']:.2f} |"
        )
    print(
        f"\nengine (batch {key}, clean) vs reference-style: {result['engine_vs_reference']:.1f}x; "
        f"vs compute floor: {result['engine_vs_floor']:.2f}"
    )
    log("done in %.0f s", result["seconds"])
    if args.json:
        print(json.dumps(result, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Benchmark bundles: a seeded, randomly initialised network, a random pool, a threshold that flags 5 % of the inputs.

The throughput bundle is a CIFAR-shaped ResNet-18 (3x32x32, 10 classes) from ``service.training.models``, exported
to ONNX and finished with ``service.store.finalize_bundle``, so the real server loads it like any other bundle
(``MIXINFER_MODEL_DIR=runs/bench/store MIXINFER_MODEL_NAME=resnet18-bench``). Its threshold is the
``1 - flag_rate`` quantile of the detection gaps of the bench inputs over several draws, measured through the real
engine, so both servers take the OL branch for about 5 % of the requests. The same recipe with ``mnist_cnn``
builds a stand-in for the default bundle when ``model_store/mnist-mixup`` holds no version.

Everything lands in the git-ignored ``runs/bench/`` and is rebuilt only when the recipe changes.

Usage: ``python bench/throughput_bundle.py [--arch resnet18] [--force]``
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":  # `python bench/x.py` puts bench/ first on sys.path, where bench/http.py would shadow
    sys.path[0] = str(Path(__file__).resolve().parent.parent)  # the standard library's http: use the repo root

import argparse
import hashlib
import io
import json
import shutil
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from bench.common import CACHE_DIR, log

RECIPE_VERSION = 1
STORE = CACHE_DIR / "store"
INPUTS = CACHE_DIR / "inputs"


@dataclass(frozen=True)
class Recipe:
    """What a bench bundle is made of; its hash names the cache entry."""

    name: str
    arch: str
    shape: tuple[int, int, int]
    n_classes: int = 10
    pool_per_class: int = 100
    n_inputs: int = 64
    flag_rate: float = 0.05
    draws: int = 8
    seed: int = 0
    version: int = RECIPE_VERSION

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


THROUGHPUT = Recipe(name="resnet18-bench", arch="resnet18", shape=(3, 32, 32))
MNIST_STANDIN = Recipe(name="mnist-bench", arch="mnist_cnn", shape=(1, 28, 28))


@dataclass(frozen=True)
class BenchBundle:
    """A built bench bundle and its bench inputs (PNG files)."""

    store: Path
    name: str
    path: Path
    inputs: list[Path]
    threshold: float
    flag_rate: float


def encode_png(image: np.ndarray) -> bytes:
    """uint8 (C, H, W) -> PNG bytes (grey for one channel, RGB for three)."""
    from PIL import Image

    arr = image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr)).save(buf, format="PNG")
    return buf.getvalue()


def write_inputs(directory: Path, images: np.ndarray) -> list[Path]:
    """Write uint8 (N, C, H, W) images as ``input_000.png``... and return the paths."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, img in enumerate(images):
        path = directory / f"input_{i:03d}.png"
        path.write_bytes(encode_png(img))
        paths.append(path)
    return paths


def measured_gaps(bundle_dir: Path, images_u8: np.ndarray, draws: int, seed: int) -> np.ndarray:
    """Detection gaps of ``images_u8`` through the real engine, ``draws`` independent draws each (flat)."""
    from service.mi.engine import MIEngine
    from service.mi.params import Mode
    from service.store import load_bundle, open_backend

    bundle = load_bundle(bundle_dir)
    backend = open_backend(bundle, providers=["CPUExecutionProvider"])
    engine = MIEngine(backend, bundle.pool_labels, bundle.manifest.mi, seed=seed)
    x = images_u8.astype(np.float32) / 255.0
    return np.concatenate([engine(x, Mode.PL).gap for _ in range(draws)])


def build(recipe: Recipe, *, force: bool = False) -> BenchBundle:
    """Build (or reuse) the bench bundle of ``recipe`` under ``runs/bench/store``."""
    bundle_dir = STORE / recipe.name / "1"
    stamp = bundle_dir.parent / ".recipe"
    input_dir = INPUTS / recipe.name
    if not force and stamp.is_file() and stamp.read_text() == recipe.key() and (bundle_dir / "manifest.json").is_file():
        manifest = json.loads((bundle_dir / "manifest.json").read_text())
        inputs = sorted(input_dir.glob("input_*.png"))
        if len(inputs) == recipe.n_inputs:
            return BenchBundle(STORE, recipe.name, bundle_dir, inputs, manifest["mi"]["threshold"], recipe.flag_rate)
    log("building bench bundle %s (%s %s) in %s", recipe.name, recipe.arch, recipe.shape, bundle_dir)
    shutil.rmtree(bundle_dir.parent, ignore_errors=True)
    shutil.rmtree(input_dir, ignore_errors=True)
    bundle_dir.mkdir(parents=True)

    import torch

    from service.store import finalize_bundle
    from service.training.export import export_bundle_model
    from service.training.models import build_model

    torch.manual_seed(recipe.seed)
    rng = np.random.default_rng(recipe.seed)
    c = recipe.shape[0]
    model = build_model(recipe.arch, recipe.n_classes, c).eval()
    export_bundle_model(model, bundle_dir, recipe.shape, n_random=16)

    k, per = recipe.n_classes, recipe.pool_per_class
    labels = np.repeat(np.arange(k, dtype=np.int64), per)
    pool = rng.integers(0, 256, size=(k * per, *recipe.shape), dtype=np.uint8)
    np.savez(bundle_dir / "pool.npz", images=pool, labels=labels)
    n_pool, n_cal, n_test = k * per, 64, recipe.n_inputs
    idx = np.arange(n_pool + n_cal + n_test, dtype=np.int64)
    splits = {
        "train": idx[:n_pool],
        "pool": idx[:n_pool],
        "calibration": idx[n_pool : n_pool + n_cal],
        "test": idx[n_pool + n_cal :],
    }
    np.savez(bundle_dir / "splits.npz", **splits)
    inputs_u8 = rng.integers(0, 256, size=(recipe.n_inputs, *recipe.shape), dtype=np.uint8)

    fields: dict[str, Any] = {
        "description": f"benchmark bundle: seeded random {recipe.arch}, random pool (NOT a trained model)",
        "architecture": recipe.arch,
        "class_names": [f"class{i}" for i in range(k)],
        "input": {"name": "images", "shape": list(recipe.shape), "output_name": "logits"},
        "dataset": {
            "name": "random",
            "sha256": hashlib.sha256(pool.tobytes() + inputs_u8.tobytes()).hexdigest(),
            "n_images": int(idx.size),
        },
        "mi": {"threshold": 0.2, "threshold_rule": "fixed=0.2"},
        "splits": {"train": n_pool, "pool": n_pool, "calibration": n_cal, "test": n_test},
        "calibration": {
            "split": "test",
            "n_images": n_test,
            "seed": recipe.seed,
            "gap_quantiles": {"0.05": 0.0, "0.5": 0.0, "0.95": 0.0},
            "false_flag_rate": recipe.flag_rate,
        },
        "accuracy": {"split": "test", "n_images": n_test, "seed": recipe.seed, "plain": 0.1, "mi_combined": 0.1},
        "recipe": {
            "command": f"python bench/throughput_bundle.py --arch {recipe.arch}",
            "seed": recipe.seed,
            "mixinfer_version": "0.1.0",
            "training": {"trained": False, "recipe_key": recipe.key()},
        },
    }
    finalize_bundle(bundle_dir, fields)
    gaps = measured_gaps(bundle_dir, inputs_u8, recipe.draws, recipe.seed)
    threshold = float(np.quantile(gaps, 1.0 - recipe.flag_rate))
    # nudge up to the next float32 above ties only if needed: flagging is gap >= threshold
    flagged = float(np.mean(gaps >= threshold))
    q = {key: float(np.quantile(gaps, float(key))) for key in ("0.05", "0.5", "0.95")}
    fields["mi"] = {"threshold": threshold, "threshold_rule": f"bench_flag_rate={recipe.flag_rate}"}
    fields["calibration"] = {**fields["calibration"], "gap_quantiles": q, "false_flag_rate": flagged}
    finalize_bundle(bundle_dir, fields)
    inputs = write_inputs(input_dir, inputs_u8)
    stamp.write_text(recipe.key())
    log(
        "%s: threshold %.4f flags %.1f %% of %d gaps (median gap %.4f)",
        recipe.name,
        threshold,
        100 * flagged,
        gaps.size,
        q["0.5"],
    )
    return BenchBundle(STORE, recipe.name, bundle_dir, inputs, threshold, flagged)


def default_bundle_inputs(bundle_dir: Path, n: int = 64, seed: int = 0, directory: Path | None = None) -> list[Path]:
    """Bench inputs for a real bundle: ``n`` pool images (real data), written once as PNGs (default: under
    ``runs/bench/inputs/<name>-<version>``)."""
    from service.store import load_bundle

    directory = directory or INPUTS / f"{bundle_dir.parent.name}-{bundle_dir.name}"
    existing = sorted(directory.glob("input_*.png"))
    if len(existing) == n:
        return existing
    shutil.rmtree(directory, ignore_errors=True)
    bundle = load_bundle(bundle_dir)
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(bundle.pool_labels), size=min(n, len(bundle.pool_labels)), replace=False)
    return write_inputs(directory, bundle.pool_images[np.sort(pick)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=("resnet18", "mnist_cnn"), default="resnet18")
    parser.add_argument("--force", action="store_true", help="rebuild even if the cached bundle matches the recipe")
    args = parser.parse_args()
    built = build(THROUGHPUT if args.arch == "resnet18" else MNIST_STANDIN, force=args.force)
    print(json.dumps({"path": str(built.path), "threshold": built.threshold, "flag_rate": built.flag_rate}))


if __name__ == "__main__":
    main()

"""Example images for the README's curl demo: clean digits, and adversarial ones the served engine flags.

``python -m service.robustness.examples --bundle model_store/mnist-mixup/1 --out examples`` writes 8-bit PNGs and
``examples/README.md``. An adversarial example is kept only if the served MI-Combined engine flags it in at least
``--min-flags`` of ``--runs`` fresh-seed runs (OS entropy, exactly as the server draws), checked on the PNG as
written (decoded back), so what is committed is what was verified.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

LOGGER = logging.getLogger(__name__)


def flag_counts(engine: object, images: NDArray[np.float32], runs: int) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """(times flagged, times the label equals the first run's majority) over ``runs`` fresh-entropy engine calls."""
    from service.mi.params import Mode

    flags = np.zeros(images.shape[0], dtype=np.int64)
    labels = []
    for _ in range(runs):
        res = engine(images, Mode.COMBINED, rng=np.random.default_rng())  # type: ignore[operator]
        flags += res.flagged
        labels.append(res.label)
    return flags, np.stack(labels)


def main(argv: list[str] | None = None) -> int:
    """Write the example PNGs; returns the exit code."""
    import torch
    from PIL import Image

    from service.mi.engine import MIEngine
    from service.robustness.attacks.core import quantize
    from service.robustness.attacks.pgd import pgd_untargeted
    from service.robustness.data import load_split
    from service.robustness.pipeline import DifferentiableMI
    from service.store import load_bundle, open_backend

    p = argparse.ArgumentParser(prog="python -m service.robustness.examples", description=__doc__)
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--out", type=Path, default=Path("examples"))
    p.add_argument("--eps", type=float, default=0.2, help="PGD radius of the adversarial examples (default 0.2)")
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--min-flags", type=int, default=19)
    p.add_argument("--n-adversarial", type=int, default=4)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO)

    bundle = load_bundle(args.bundle, require_weights=True)
    names = bundle.manifest.class_names
    engine = MIEngine(open_backend(bundle, providers=["CPUExecutionProvider"]), bundle.pool_labels, bundle.manifest.mi)
    x_all, y_all, idx_all = load_split(bundle, "test")
    spread = np.linspace(0, y_all.size - 1, 150).astype(np.int64)  # the split is class-sorted: take every class
    x_np, y_np, idx = x_all[spread], y_all[spread], idx_all[spread]
    twin = DifferentiableMI.from_bundle(bundle)
    x, y = torch.from_numpy(x_np), torch.from_numpy(y_np)
    x_adv = quantize(pgd_untargeted(twin.logits, x, y, eps=args.eps, step=0.01, steps=100), x, args.eps).numpy()
    args.out.mkdir(parents=True, exist_ok=True)

    def save_and_reload(img: NDArray[np.float32], path: Path) -> NDArray[np.float32]:
        Image.fromarray(np.round(img[0, 0] * 255).astype(np.uint8)).save(path)
        with Image.open(path) as im:
            return np.asarray(im, dtype=np.float32)[None, None] / np.float32(255.0)

    lines = [
        "# Example inputs for the curl demo",
        "",
        f"Bundle `{bundle.manifest.name}/{bundle.manifest.version}`; each file checked on its decoded PNG pixels "
        f"against the served MI-Combined engine in {args.runs} fresh-seed runs (`python -m "
        f"service.robustness.examples --bundle {args.bundle} --out {args.out}`).",
        "",
        "| file | true label | base model says | MI-Combined says (majority) | flagged in |",
        "|---|---|---|---|---|",
    ]
    backend = engine.backend
    clean_flags, _ = flag_counts(engine, x_np, args.runs)
    kept = 0
    for k in range(len(names)):
        cand = np.flatnonzero((y_np == k) & (clean_flags == 0) & (backend.probs(x_np).argmax(1) == y_np))
        if cand.size == 0:
            continue
        i = int(cand[0])
        path = args.out / f"clean_{names[k]}.png"
        img = save_and_reload(x_np[i : i + 1], path)
        f, labels = flag_counts(engine, img, args.runs)
        lines.append(
            f"| {path.name} | {names[k]} | {names[int(backend.probs(img).argmax())]} | "
            f"{names[int(np.bincount(labels[:, 0]).argmax())]} | {int(f[0])}/{args.runs} |"
        )
    adv_flags, _ = flag_counts(engine, x_adv, args.runs)
    wrong = backend.probs(x_adv).argmax(1) != y_np
    used: set[int] = set()
    for i in np.flatnonzero((adv_flags >= args.runs) & wrong).tolist():
        if kept >= args.n_adversarial:
            break
        if int(y_np[i]) in used:  # one per true class
            continue
        path = args.out / f"adversarial_{kept}_true{names[int(y_np[i])]}.png"
        img = save_and_reload(x_adv[i : i + 1], path)
        f, labels = flag_counts(engine, img, args.runs)
        if f[0] < args.min_flags:
            path.unlink()
            continue
        kept += 1
        used.add(int(y_np[i]))
        lines.append(
            f"| {path.name} | {names[int(y_np[i])]} | {names[int(backend.probs(img).argmax())]} | "
            f"{names[int(np.bincount(labels[:, 0]).argmax())]} | {int(f[0])}/{args.runs} |"
        )
        LOGGER.info("kept %s (dataset index %d)", path.name, int(idx[i]))
    lines += ["", f"Adversarial files: L∞ PGD on the base model, ε = {args.eps}, 100 steps, 8-bit pixels.", ""]
    (args.out / "README.md").write_text("\n".join(lines), encoding="utf-8")
    sys.stdout.write("\n".join(lines) + "\n")
    return 0 if kept else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""Example images for the README's curl demo: clean digits, and adversarial ones the served engine flags.

``python -m service.robustness.examples --bundle model_store/mnist-mixup/2 --out examples`` writes 8-bit PNGs and
``examples/README.md``. An adversarial example is kept only if the served MI-Combined engine flags it in at least
``--min-flags`` of ``--runs`` fresh-seed runs (OS entropy, exactly as the server draws), checked on the PNG as
written (decoded back), so what is committed is what was verified.

``--recheck`` keeps the PNGs and re-verifies them on another bundle (a new version that keeps the model and the
threshold, e.g. one with another OL λ): it rewrites the table and fails if an adversarial file is flagged in fewer than
``--min-flags`` runs or no longer fools the base model, or a clean one is misread or flagged in more than a quarter.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

LOGGER = logging.getLogger(__name__)


def flag_counts(
    engine: object, images: NDArray[np.float32], runs: int, rng: np.random.Generator | None = None
) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """(times flagged, each run's labels (runs, B)) over ``runs`` engine calls drawing from ``rng`` (None: fresh OS
    entropy for every call, as the server draws)."""
    from service.mi.params import Mode

    flags = np.zeros(images.shape[0], dtype=np.int64)
    labels = []
    for _ in range(runs):
        draws = rng if rng is not None else np.random.default_rng()
        res = engine(images, Mode.COMBINED, rng=draws)  # type: ignore[operator]
        flags += res.flagged
        labels.append(res.label)
    return flags, np.stack(labels)


def _load_png(path: Path) -> NDArray[np.float32]:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im, dtype=np.float32)[None, None] / np.float32(255.0)


def _row(
    engine: Any, names: Sequence[str], img: NDArray[np.float32], path: Path, true_k: int, *, args: argparse.Namespace
) -> tuple[str, int, bool]:
    """The README row of one written file (checked on its decoded pixels), how often it was flagged, and whether
    the base model misreads it."""
    runs = args.runs
    f, labels = flag_counts(engine, img, runs, args.rng)
    base_k = int(engine.backend.probs(img).argmax())
    majority = names[int(np.bincount(labels[:, 0]).argmax())]
    row = f"| {path.name} | {names[true_k]} | {names[base_k]} | {majority} | {int(f[0])}/{runs} |"
    return row, int(f[0]), base_k != true_k


def _recheck(engine: Any, names: Sequence[str], args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """Rows for the PNGs already in ``args.out`` on this bundle, and what no longer holds (empty: all hold)."""
    rows, broken = [], []
    clean, adversarial_files = sorted(args.out.glob("clean_*.png")), sorted(args.out.glob("adversarial_*_true*.png"))
    for path in clean + adversarial_files:
        adversarial = path.stem.startswith("adversarial_")
        label = path.stem.split("true")[1] if adversarial else path.stem.split("_", 1)[1]
        if label not in names:
            broken.append(f"{path.name}: true label {label!r} from the file name, expected one of {list(names)}")
            continue
        row, flags, fooled = _row(engine, names, _load_png(path), path, names.index(label), args=args)
        rows.append(row)
        if adversarial and (flags < args.min_flags or not fooled):
            broken.append(
                f"{path.name}: flagged in {flags}/{args.runs} (expected >= {args.min_flags}), base model "
                f"{'fooled' if fooled else 'right'} (expected fooled)"
            )
        if not adversarial and (flags > args.runs // 4 or fooled):
            broken.append(
                f"{path.name}: flagged in {flags}/{args.runs} (expected <= {args.runs // 4}), "
                f"base model {'wrong' if fooled else 'right'} (expected right)"
            )
    if not clean or not adversarial_files:
        broken.append(
            f"{args.out}: expected clean_*.png and adversarial_*_true*.png files, got {len(clean)} and "
            f"{len(adversarial_files)}"
        )
    return rows, broken


def main(argv: list[str] | None = None) -> int:
    """Write the example PNGs (or recheck the written ones); returns the exit code."""
    from service.mi.engine import MIEngine
    from service.store import load_bundle, open_backend

    p = argparse.ArgumentParser(prog="python -m service.robustness.examples", description=__doc__)
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--out", type=Path, default=Path("examples"))
    p.add_argument("--eps", type=float, default=0.2, help="PGD radius of the adversarial examples (default 0.2)")
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--min-flags", type=int, default=19)
    p.add_argument("--n-adversarial", type=int, default=4)
    p.add_argument(
        "--seed",
        type=int,
        default=None,
        help="seed of the engine's draws (default: fresh OS entropy per run, as served)",
    )
    p.add_argument(
        "--recheck",
        action="store_true",
        help="keep the PNGs in --out and check them on --bundle (a new version with the same model and threshold): "
        "rewrite README.md's table (its last line, how the files were made, is kept); exit 1 (README untouched) if "
        "an adversarial file is flagged in fewer than --min-flags runs or no longer fools the base model, or a "
        "clean one is misread or flagged in over a quarter of the runs (a statistical check: fix --seed to repeat it)",
    )
    args = p.parse_args(argv)
    args.rng = np.random.default_rng(args.seed) if args.seed is not None else None
    logging.basicConfig(level=logging.INFO)

    bundle = load_bundle(args.bundle, require_weights=True)
    names = bundle.manifest.class_names
    engine = MIEngine(open_backend(bundle, providers=["CPUExecutionProvider"]), bundle.pool_labels, bundle.manifest.mi)
    command = f"python -m service.robustness.examples --bundle {args.bundle} --out {args.out}"
    command += " --recheck" * args.recheck + (f" --seed {args.seed}" if args.seed is not None else "")
    made = f"Adversarial files: L∞ PGD on the base model, ε = {args.eps}, 100 steps, 8-bit pixels."
    if args.recheck:
        rows, broken = _recheck(engine, names, args)
        readme = args.out / "README.md"
        kept = (
            [ln for ln in readme.read_text().splitlines() if ln.startswith("Adversarial files:")]
            if readme.is_file()
            else []
        )
        made = kept[-1] if kept else made
        if not kept:
            broken.append(
                f"{readme}: expected its 'Adversarial files:' line (how the files were made) to keep, got none"
            )
    else:
        rows, broken = _generate(bundle, engine, names, args)
    draws = "fresh-seed runs" if args.seed is None else f"runs (engine seed {args.seed})"
    lines = [
        "# Example inputs for the curl demo",
        "",
        f"Bundle `{bundle.manifest.name}/{bundle.manifest.version}`; each file checked on its decoded PNG pixels "
        f"against the served MI-Combined engine in {args.runs} {draws} (`{command}`).",
        "",
        "| file | true label | base model says | MI-Combined says (majority) | flagged in |",
        "|---|---|---|---|---|",
        *rows,
        "",
        made,
        "",
    ]
    for problem in broken:
        LOGGER.error("%s", problem)
    if not broken:
        (args.out / "README.md").write_text("\n".join(lines), encoding="utf-8")
    sys.stdout.write("\n".join(lines) + "\n")
    return 1 if broken else 0


def _generate(bundle: Any, engine: Any, names: Sequence[str], args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """Attack the test split, write the clean and adversarial PNGs; their rows, and a problem if none was kept."""
    import torch
    from PIL import Image

    from service.robustness.attacks.core import quantize
    from service.robustness.attacks.pgd import pgd_untargeted
    from service.robustness.data import load_split
    from service.robustness.pipeline import DifferentiableMI

    x_all, y_all, idx_all = load_split(bundle, "test")
    spread = np.linspace(0, y_all.size - 1, 150).astype(np.int64)  # the split is class-sorted: take every class
    x_np, y_np, idx = x_all[spread], y_all[spread], idx_all[spread]
    twin = DifferentiableMI.from_bundle(bundle)
    x, y = torch.from_numpy(x_np), torch.from_numpy(y_np)
    x_adv = quantize(pgd_untargeted(twin.logits, x, y, eps=args.eps, step=0.01, steps=100), x, args.eps).numpy()
    args.out.mkdir(parents=True, exist_ok=True)
    for stale in args.out.glob("adversarial_*.png"):  # a new run keeps another set: none of the old may linger
        stale.unlink()

    def save_and_reload(img: NDArray[np.float32], path: Path) -> NDArray[np.float32]:
        Image.fromarray(np.round(img[0, 0] * 255).astype(np.uint8)).save(path)
        return _load_png(path)

    rows = []
    backend = engine.backend
    clean_flags, _ = flag_counts(engine, x_np, args.runs, args.rng)
    for k in range(len(names)):
        cand = np.flatnonzero((y_np == k) & (clean_flags == 0) & (backend.probs(x_np).argmax(1) == y_np))
        if cand.size == 0:
            continue
        i = int(cand[0])
        path = args.out / f"clean_{names[k]}.png"
        rows.append(_row(engine, names, save_and_reload(x_np[i : i + 1], path), path, k, args=args)[0])
    adv_flags, _ = flag_counts(engine, x_adv, args.runs, args.rng)
    wrong = backend.probs(x_adv).argmax(1) != y_np
    used: set[int] = set()
    kept = 0
    for i in np.flatnonzero((adv_flags >= args.runs) & wrong).tolist():
        if kept >= args.n_adversarial:
            break
        if int(y_np[i]) in used:  # one per true class
            continue
        path = args.out / f"adversarial_{kept}_true{names[int(y_np[i])]}.png"
        row, flags, _ = _row(engine, names, save_and_reload(x_adv[i : i + 1], path), path, int(y_np[i]), args=args)
        if flags < args.min_flags:
            path.unlink()
            continue
        kept += 1
        used.add(int(y_np[i]))
        rows.append(row)
        LOGGER.info("kept %s (dataset index %d)", path.name, int(idx[i]))
    return rows, [] if kept else ["no adversarial example was flagged often enough"]


if __name__ == "__main__":
    raise SystemExit(main())

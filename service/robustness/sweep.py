"""``mixinfer calibrate --sweep``: the paper's lambda trade-off (clean vs oblivious-PGD accuracy) and the pick rule.

For each lambda of a small grid, MI-PL (lambda_PL), MI-OL (stand-alone lambda_OL) and MI-Combined (the lambda of
the OL branch that answers flagged inputs; threshold and PL branch as served) are scored by the served engine on
the calibration split, clean and under oblivious PGD on the base model (the paper's Figure: clean accuracy
against adversarial accuracy as lambda varies). Rule: among the lambdas whose clean accuracy stays within
``--sweep-max-clean-drop`` of the plain model's, pick the one with the best adversarial accuracy (all seeds right),
ties to the larger lambda (closer to the plain model). The sweep writes ``sweep.json`` and ``sweep.png`` and prints
the pick; it never edits a bundle (recalibrate with the picked values to change one).

Registration imports nothing heavy: torch is imported in :func:`run_sweep`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

LOGGER = logging.getLogger(__name__)

DEFAULT_LAMS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
#: seed of the PGD random starts (fixed and recorded: the sweep is reproducible, the attacks' own seeds are separate)
PGD_SEED = 0
#: the swept branches, each the served mode of that name with one λ of the manifest varied: key -> manifest field
BRANCH_FIELD = {"pl": "lam_pl", "ol": "ol_standalone", "combined": "ol_combined"}
#: key -> label in plots and reports
BRANCH_LABEL = {"pl": "MI-PL", "ol": "MI-OL", "combined": "MI-Combined (OL branch λ)"}


def served_lam(mi: dict[str, Any], branch: str) -> float:
    """The λ a manifest's ``mi`` section (as JSON) serves for a swept ``branch``."""
    value = mi[BRANCH_FIELD[branch]]
    return float(value["lam"] if isinstance(value, dict) else value)


def add_sweep_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``--sweep`` options to ``mixinfer calibrate`` (the parser must provide ``--bundle``)."""
    g = parser.add_argument_group("lambda sweep (robustness; needs the eval extra)")
    g.add_argument("--sweep", action="store_true", help="run the lambda trade-off sweep instead of calibrating")
    g.add_argument("--sweep-lams", type=float, nargs="+", default=list(DEFAULT_LAMS), help="lambda grid")
    g.add_argument("--sweep-images", type=int, default=200, help="calibration images (default 200)")
    g.add_argument("--sweep-eps", type=float, default=None, help="PGD eps (default: 0.1 MNIST, 8/255 CIFAR)")
    g.add_argument("--sweep-steps", type=int, default=40, help="oblivious PGD steps (default 40)")
    g.add_argument("--sweep-seeds", type=int, nargs="+", default=[11, 22, 33], help="server seeds (default 3)")
    g.add_argument("--sweep-max-clean-drop", type=float, default=0.03, help="allowed clean-accuracy drop (0.03)")
    g.add_argument("--sweep-out", type=Path, default=None, help="output dir (default docs/robustness/<name>/sweep)")


def pick_lambda(rows: list[dict[str, Any]], plain_clean: float, max_drop: float) -> float:
    """The rule: best adversarial accuracy among lambdas within ``max_drop`` of the plain clean accuracy.

    Ties go to the larger lambda; when no lambda qualifies, the largest lambda (the mildest MI) is returned.
    """
    ok = [r for r in rows if r["clean"] >= plain_clean - max_drop - 1e-12]
    if not ok:
        return max(r["lam"] for r in rows)
    return max(ok, key=lambda r: (r["adversarial"], r["lam"]))["lam"]


def run_sweep(args: argparse.Namespace) -> int:
    """Handler of ``mixinfer calibrate --sweep``; returns the exit code."""
    import numpy as np
    import torch

    from service.mi.engine import MIEngine
    from service.mi.params import MixSpec, Mode
    from service.robustness.attacks.core import quantize
    from service.robustness.attacks.pgd import pgd_untargeted
    from service.robustness.budgets import threat_for
    from service.robustness.data import load_split
    from service.robustness.pipeline import DifferentiableMI
    from service.store import load_bundle, open_backend

    if args.bundle is None:
        raise SystemExit("mixinfer calibrate --sweep: --bundle is required")
    bundle = load_bundle(Path(args.bundle), require_weights=True)
    threat = threat_for(bundle.manifest.input.shape)
    eps = args.sweep_eps if args.sweep_eps is not None else threat.eps_curve[0]
    step = max(threat.step, 2.5 * eps / args.sweep_steps)
    x_np, y_np, _ = load_split(bundle, "calibration", args.sweep_images, getattr(args, "data_dir", None))
    x = torch.from_numpy(x_np)
    twin = DifferentiableMI.from_bundle(bundle)
    gen = torch.Generator().manual_seed(PGD_SEED)  # the random starts: a rerun reproduces the sweep
    x_adv = torch.cat(
        [
            pgd_untargeted(
                twin.logits,
                x[i : i + 64],
                torch.from_numpy(y_np[i : i + 64]),
                eps=eps,
                step=step,
                steps=args.sweep_steps,
                gen=gen,
            )
            for i in range(0, x.shape[0], 64)
        ]
    )
    adv_np = quantize(x_adv, x, eps).numpy()
    backend = open_backend(bundle, providers=["CPUExecutionProvider"])
    base = bundle.manifest.mi

    def acc(params: Any, mode: Mode, images: Any) -> float:
        engine = MIEngine(backend, bundle.pool_labels, params)
        right = [engine(images, mode, rng=np.random.default_rng(s)).label == y_np for s in args.sweep_seeds]
        return float(np.all(right, axis=0).mean())

    plain_clean = float((backend.probs(x_np).argmax(1) == y_np).mean())
    plain_adv = float((backend.probs(adv_np).argmax(1) == y_np).mean())
    result: dict[str, Any] = {
        "eps": eps,
        "steps": args.sweep_steps,
        "step": step,
        "pgd_seed": PGD_SEED,
        "n_images": int(y_np.size),
        "seeds": args.sweep_seeds,
        "plain": {"clean": plain_clean, "adversarial": plain_adv},
        "max_clean_drop": args.sweep_max_clean_drop,
        "bundle": {"name": bundle.manifest.name, "version": bundle.manifest.version},
    }
    for branch, field in BRANCH_FIELD.items():
        mode, rows = Mode(branch), []
        for lam in args.sweep_lams:
            value = lam if field == "lam_pl" else MixSpec(lam=lam, n=getattr(base, field).n)
            params = base.model_copy(update={field: value})
            rows.append({"lam": lam, "clean": acc(params, mode, x_np), "adversarial": acc(params, mode, adv_np)})
            LOGGER.info(
                "sweep %s lam %.2f: clean %.3f, adversarial %.3f",
                branch,
                lam,
                rows[-1]["clean"],
                rows[-1]["adversarial"],
            )
        result[branch] = {"rows": rows, "pick": pick_lambda(rows, plain_clean, args.sweep_max_clean_drop)}

    out = args.sweep_out if args.sweep_out is not None else Path("docs/robustness") / bundle.manifest.name / "sweep"
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    _plot(result, out / "sweep.png", bundle.manifest.name)
    lines = [
        f"wrote {out / 'sweep.json'} and {out / 'sweep.png'}",
        f"calibration split, {y_np.size} images, oblivious PGD eps {eps:.3g}, {args.sweep_steps} steps, "
        f"seeds {args.sweep_seeds}: plain clean {plain_clean:.3f}, adversarial {plain_adv:.3f}",
        f"pick (max adversarial accuracy with clean drop <= {args.sweep_max_clean_drop}): "
        f"lam_pl={result['pl']['pick']}, ol_standalone.lam={result['ol']['pick']}, "
        f"ol_combined.lam={result['combined']['pick']}",
    ]
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


def _plot(result: dict[str, Any], path: Path, name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.0, 4.4))
    for branch, marker in zip(BRANCH_FIELD, ("o-", "s-", "^-"), strict=True):
        if branch not in result:  # sweeps written before the Combined rows
            continue
        rows = result[branch]["rows"]
        ax.plot(
            [100 * r["clean"] for r in rows],
            [100 * r["adversarial"] for r in rows],
            marker,
            label=BRANCH_LABEL[branch],
        )
        for r in rows:
            ax.annotate(f"λ={r['lam']:.2g}", (100 * r["clean"], 100 * r["adversarial"]), fontsize=7)
    p = result["plain"]
    ax.plot([100 * p["clean"]], [100 * p["adversarial"]], "k*", markersize=10, label="base model")
    ax.set(
        xlabel="clean accuracy (%)",
        ylabel=f"oblivious PGD accuracy (%), ε={result['eps']:.3g}",
        title=f"{name}: λ trade-off ({result['n_images']} calibration images)",
    )
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

"""``mixinfer evaluate``: registration (imports nothing heavy) and the handler (imports torch lazily)."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

LOGGER = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``mixinfer evaluate`` to the dispatcher."""
    from service.robustness.budgets import BUDGETS

    p = subparsers.add_parser(
        "evaluate",
        help="robustness report of a bundle: oblivious, adaptive and black-box attacks scored by the served engine",
        description=(
            "Attack exactly what is served (same bundle, pool, N, lambda, threshold) and write results.json, "
            "report.md and plots. Torch supplies gradients only; final adversarial inputs are rounded to 8-bit "
            "pixels and scored by the served ONNX engine under several fresh server seeds (broken if any seed is "
            "wrong). Budgets: quick (tests, ~20 images), cpu (the committed reports, 32 images: within 90 minutes on 2 "
            "CPU cores, minutes on a GPU), paper (SPEC 9.3)."
        ),
    )
    p.add_argument("--bundle", type=Path, required=True, help="bundle directory, e.g. model_store/mnist-mixup/1")
    p.add_argument("--budget", choices=sorted(BUDGETS), default="cpu", help="named budget (default: cpu)")
    p.add_argument("--out", type=Path, default=None, help="output directory (default: docs/robustness/<name>)")
    p.add_argument("--n-images", type=int, default=None, help="override the budget's number of test images")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="server seeds (default: fresh from OS entropy)")
    p.add_argument(
        "--attack-seed",
        type=int,
        default=None,
        help="root seed of the attacks' generators (recorded; default 0, or the report's with --plateau-only)",
    )
    p.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="adversarial inputs cached per attack and seed, so a stopped run resumes "
        "(default: runs/robustness-cache/<name>, shared by the versions of a model: entries are keyed by the bundle's "
        "file hashes and the MI parameters each attack reads; --no-cache disables)",
    )
    p.add_argument("--no-cache", action="store_true", help="do not read or write the attack cache")
    p.add_argument(
        "--plateau",
        nargs="+",
        default=None,
        metavar="ATTACK",
        help="after the report, rerun these attacks (e.g. force-flagged apgd-force-flagged) with steps, EOT draws "
        "and restarts doubled and across eps; writes plateau.json/.md/.png next to the report",
    )
    p.add_argument(
        "--plateau-images",
        type=int,
        default=None,
        help="plateau on the first N images of the report's subset (default: all of them; each plateau attack "
        "costs about 11 runs of it)",
    )
    p.add_argument(
        "--plateau-only",
        action="store_true",
        help="run only the --plateau attacks (cached and resumable like the report's) on the setting of the report "
        "in --out (its seeds, eps, attack seed and budget), then re-render that report with the plateau summarised",
    )
    p.add_argument(
        "--data-dir",
        "--data-root",
        dest="data_dir",
        type=Path,
        default=None,
        help="dataset directory (CIFAR python batches, image folders); not used by mnist5k",
    )
    p.add_argument("--only", nargs="+", default=None, help="run only attacks whose name starts with these prefixes")
    p.add_argument(
        "--eps", type=float, default=None, help="headline eps of the adaptive rows (default: 0.3 MNIST, 8/255 CIFAR)"
    )
    p.add_argument(
        "--device",
        default="auto",
        help="torch device of the gradients: auto (cuda when available, else cpu), cpu, cuda, cuda:1, ... "
        "(scoring always runs the served ONNX engine on the CPU provider)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Handler of ``mixinfer evaluate``; returns the exit code."""
    import torch

    from service.robustness.budgets import get_budget
    from service.robustness.evaluate import run_evaluation
    from service.robustness.report import write_report
    from service.store import load_bundle

    if args.threads:
        torch.set_num_threads(args.threads)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        LOGGER.error("--device %s: torch sees no CUDA device (torch %s)", device, torch.__version__)
        return 2
    overrides = {"n_images": args.n_images} if args.n_images else {}
    budget = get_budget(args.budget, **overrides)
    bundle = load_bundle(args.bundle, require_weights=True)
    out = args.out if args.out is not None else Path("docs/robustness") / bundle.manifest.name
    cache = args.cache_dir or Path("runs/robustness-cache") / bundle.manifest.name
    if (args.plateau_only or args.plateau_images is not None) and not args.plateau:
        LOGGER.error("--plateau-only and --plateau-images need --plateau ATTACK [ATTACK ...]")
        return 2
    if args.plateau:
        from service.robustness.plateau import plateau_attack_error

        problems = [p for p in (plateau_attack_error(a) for a in args.plateau) if p]
        if args.plateau_images is not None and args.plateau_images < 1:
            problems.append(f"--plateau-images must be at least 1, got {args.plateau_images}")
        if problems:
            LOGGER.error("; ".join(problems))
            return 2
    if args.plateau_only:
        return _plateau_only(args, bundle, budget, device=device, cache=cache, out=out)
    args.attack_seed = args.attack_seed if args.attack_seed is not None else 0
    res = run_evaluation(
        bundle,
        budget,
        seeds=args.seeds,
        attack_seed=args.attack_seed,
        cache_dir=None if args.no_cache else cache,
        data_root=args.data_dir,
        only=tuple(args.only) if args.only else None,
        eps=args.eps,
        device=device,
        show_progress=not args.no_progress,
    )
    paths = write_report(res, out)  # the report first: a failing or interrupted plateau never loses it
    if args.plateau:
        _plateau(
            args, bundle, budget, seeds=res["seeds"], eps=res["threat"]["eps"], device=device, cache=cache, out=out
        )
        paths = write_report(res, out)
    comb = res["worst_case"]["combined"]
    base = res["worst_case"]["off"]
    print(f"wrote {', '.join(str(p) for p in paths)}")
    print(
        f"{res['budget_text']}\nper-image worst case at eps {res['threat']['eps']:.3g}: "
        f"base model {100 * base['all_attacks']:.1f}%, MI-Combined {100 * comb['all_attacks']:.1f}%"
    )
    for w in res["warnings"]:
        print(f"warning: {w}")
    return 0


def _plateau_only(args: argparse.Namespace, bundle: Any, budget: Any, *, device: str, cache: Path, out: Path) -> int:
    """``--plateau-only``: the plateau on the setting of the report in ``out`` (seeds, eps, attack seed, budget).

    Settings not given on the command line are taken from the report's ``results.json``; a given one that differs
    is refused, so the plateau folded into a report always ran on that report's setting. Without a report, the
    command line's setting is used (fresh seeds unless ``--seeds``).
    """
    import numpy as np

    from service.robustness.report import write_report

    res_path = out / "results.json"
    if not res_path.exists():
        args.attack_seed = args.attack_seed if args.attack_seed is not None else 0
        seeds = args.seeds or [int(s) for s in np.random.SeedSequence().generate_state(budget.seeds)]
        _plateau(args, bundle, budget, seeds=seeds, eps=args.eps, device=device, cache=cache, out=out)
        return 0
    res = json.loads(res_path.read_text(encoding="utf-8"))
    given = {"seeds": args.seeds, "eps": args.eps, "attack_seed": args.attack_seed}
    report = {"seeds": res["seeds"], "eps": res["threat"]["eps"], "attack_seed": res["attack_seed"]}
    conflicts = [f"{k} {given[k]} (the report's: {v})" for k, v in report.items() if given[k] not in (None, v)]
    if budget.as_dict() != res["budget"]:
        conflicts.append(f"budget {budget.as_dict()} (the report's: {res['budget']})")
    if (res["bundle"]["name"], res["bundle"]["version"]) != (bundle.manifest.name, bundle.manifest.version):
        conflicts.append(
            f"bundle {bundle.manifest.name}/{bundle.manifest.version} (the report's: "
            f"{res['bundle']['name']}/{res['bundle']['version']})"
        )
    if conflicts:
        LOGGER.error(
            "--plateau-only beside %s: %s; match the report or use another --out", res_path, "; ".join(conflicts)
        )
        return 2
    args.attack_seed = res["attack_seed"]
    _plateau(args, bundle, budget, seeds=res["seeds"], eps=res["threat"]["eps"], device=device, cache=cache, out=out)
    write_report(res, out)  # the report beside it now summarises the plateau
    return 0


def _plateau(
    args: argparse.Namespace,
    bundle: Any,
    budget: Any,
    *,
    seeds: list[int],
    eps: float | None,
    device: str,
    cache: Path,
    out: Path,
) -> None:
    """Run the plateau of ``args.plateau`` and write it into ``out`` (the report picks it up from there)."""
    from service.robustness.plateau import plateau_for_bundle, write_plateau

    plateau = plateau_for_bundle(
        bundle,
        budget,
        tuple(args.plateau),
        seeds=seeds,
        device=device,
        n_images=args.plateau_images,
        eps=eps,
        attack_seed=args.attack_seed,
        cache_dir=None if args.no_cache else cache,
        data_root=args.data_dir,
    )
    write_plateau(plateau, out, budget.describe(plateau["n_images"]))

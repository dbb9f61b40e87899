"""``mixinfer evaluate``: attack exactly what is served and score every adversarial input with the served engine.

Walk: load the bundle (same manifest, pool, N, lambda, threshold) -> torch twin for gradients -> test split ->
attacks (oblivious, transfer, adaptive, black-box, cross-checks) -> round to 8-bit pixels -> served ONNX engine
under several fresh seeds -> metrics -> checks -> ``results.json``, ``report.md`` and plots.
"""

from __future__ import annotations

import logging
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from service.mi.params import Mode
from service.robustness import checks, metrics
from service.robustness.attacks import crosscheck, eot_combined, ol_direct, pgd, pl_aware, square
from service.robustness.attacks.core import eot_gradient, quantize
from service.robustness.baselines import BASELINES, predict_baseline
from service.robustness.budgets import Budget, ThreatModel, threat_for
from service.robustness.pipeline import DifferentiableMI, twin_or_reason
from service.robustness.served import SERVED_MODES, SeedScores, ServedScorer

LOGGER = logging.getLogger(__name__)

#: attack groups, in report order
OBLIVIOUS, TRANSFER, ADAPTIVE, BLACKBOX, CROSSCHECK = "oblivious", "transfer", "adaptive", "black-box", "cross-check"


@dataclass
class Context:
    """Everything an attack needs: the twin, the served scorer, the budget, the threat model, generators."""

    mi: DifferentiableMI | None  #: None: no faithful twin (imported graph), black-box attacks only
    scorer: ServedScorer
    budget: Budget
    threat: ThreatModel
    gen: np.random.Generator
    progress: Callable[[int], None] = field(default=lambda n: None)

    def step(self, n: int) -> None:
        """Advance the current attack's progress bar (looked up at call time: bars change per attack)."""
        self.progress(n)


@dataclass(frozen=True)
class AttackSpec:
    """One row of the report: how to build the adversarial inputs and what to score them with."""

    name: str
    group: str
    eps: float
    description: str
    run: Callable[[Context, torch.Tensor, torch.Tensor], torch.Tensor]
    n_images: int | None = None  #: None: all images of the budget
    targets: bool = False  #: the run returns targets too (targeted attacks)
    baselines: bool = False  #: also score the input-transformation baselines


def _batched(ctx: Context, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Callable[..., torch.Tensor]:
    def run(_: Context, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        bs = ctx.budget.attack_batch
        return torch.cat([fn(x[i : i + bs], y[i : i + bs]) for i in range(0, x.shape[0], bs)])

    return run


def step_for(step: float, eps: float, steps: int) -> float:
    """The threat model's step, raised to 2.5 eps / steps (Madry et al.'s rule) when too few steps could not
    otherwise cross the eps-ball (reduced budgets)."""
    return max(step, 2.5 * eps / steps)


def _oblivious(
    ctx: Context, eps: float, step: float, which: str
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Oblivious untargeted PGD on the base model; label = clean prediction (``pred``) or ground truth (``gt``)."""
    b, mi = ctx.budget, ctx.mi
    assert mi is not None  # attack_plan returns before any white-box attack without a twin

    def run(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        label = mi.logits(x).argmax(1).detach() if which == "pred" else y
        return pgd.pgd_untargeted(
            mi.logits, x, label, eps=eps, step=step, steps=b.oblivious_steps, restarts=b.restarts, progress=ctx.progress
        )

    return run


def attack_plan(ctx: Context, targets: torch.Tensor) -> list[AttackSpec]:
    """The attacks of one evaluation, in report order (budget and threat model from ``ctx``).

    Args:
        ctx: the evaluation context.
        targets: int64 (B,) the targeted attack's target per image (uniform over the other classes).
    """
    b, t, mi = ctx.budget, ctx.threat, ctx.mi
    if mi is None:
        return [square_spec(ctx)]
    specs: list[AttackSpec] = []
    for eps in t.eps_curve:
        step = step_for(t.step, eps, b.oblivious_steps)
        for which in ("pred", "gt"):
            specs.append(
                AttackSpec(
                    f"pgd-{which}@{eps:.3g}",
                    OBLIVIOUS,
                    eps,
                    f"oblivious PGD on the base model, {b.oblivious_steps} steps of {step:.3g}, label = "
                    + ("the clean prediction (paper)" if which == "pred" else "the ground truth"),
                    _batched(ctx, _oblivious(ctx, eps, step, which)),
                    baselines=True,
                )
            )
    e, s = t.eps, step_for(t.adaptive_step, t.eps, b.adaptive_steps)
    s_obl, s_tr = step_for(t.step, e, b.oblivious_steps), step_for(t.step, e, b.transfer_steps)
    specs.append(
        AttackSpec(
            f"pgd-targeted@{e:.3g}",
            OBLIVIOUS,
            e,
            f"oblivious targeted PGD (random other class) on the base model, {b.oblivious_steps} steps of {s_obl:.3g}",
            lambda c, x, y: torch.cat(
                [
                    pgd.pgd_targeted(
                        mi.logits,
                        x[i : i + b.attack_batch],
                        targets[i : i + b.attack_batch],
                        eps=e,
                        step=s_obl,
                        steps=b.oblivious_steps,
                        restarts=b.restarts,
                        progress=c.progress,
                    )
                    for i in range(0, x.shape[0], b.attack_batch)
                ]
            ),
            targets=True,
            baselines=True,
        )
    )
    specs.append(
        AttackSpec(
            f"transfer@{e:.3g}",
            TRANSFER,
            e,
            f"transfer: PGD on the base model, {b.transfer_steps} steps of {s_tr:.3g}, ground-truth label, then MI",
            _batched(
                ctx,
                lambda x, y: pgd.pgd_untargeted(
                    mi.logits, x, y, eps=e, step=s_tr, steps=b.transfer_steps, progress=ctx.progress
                ),
            ),
        )
    )
    adaptive_kw: dict[str, Any] = {"eps": e, "step": s, "steps": b.adaptive_steps, "eot": b.eot, "restarts": b.restarts}
    steps_txt = f"{b.adaptive_steps} steps of {s:.3g}, EOT {b.eot}, {b.restarts} restart(s)"
    for name, fn, what in (
        ("eot-combined", eot_combined.eot_pgd_combined, "EOT-PGD through the full MI-Combined pipeline"),
        ("pl-aware", pl_aware.pl_aware_pgd, "detector-aware PGD on MI-PL (gap kept under the threshold)"),
        ("ol-direct", ol_direct.ol_direct_pgd, "direct EOT-PGD on the MI-OL branch (Tramèr et al.)"),
    ):
        specs.append(
            AttackSpec(
                f"{name}@{e:.3g}",
                ADAPTIVE,
                e,
                f"{what}, {steps_txt}, ground-truth label",
                _batched(ctx, partial(fn, mi, gen=ctx.gen, progress=ctx.step, **adaptive_kw)),
            )
        )
    standalone = mi.params.ol_standalone
    specs.append(
        AttackSpec(
            f"ol-standalone@{e:.3g}",
            ADAPTIVE,
            e,
            f"direct EOT-PGD on the stand-alone MI-OL mode (λ {standalone.lam}, N {standalone.n}), {steps_txt}",
            _batched(
                ctx,
                partial(ol_direct.ol_direct_pgd, mi, gen=ctx.gen, progress=ctx.step, ol_spec=standalone, **adaptive_kw),
            ),
        )
    )
    specs.append(square_spec(ctx))
    n_cc = min(b.crosscheck_images, b.n_images)
    specs.append(
        AttackSpec(
            f"apgd-eot@{e:.3g}",
            CROSSCHECK,
            e,
            f"torchattacks APGD-CE through MI-Combined, {b.apgd_steps} steps, EOT {b.eot}",
            _batched(
                ctx, lambda x, y: crosscheck.apgd_eot(mi, x, y, eps=e, steps=b.apgd_steps, eot=b.eot, gen=ctx.gen)
            ),
            n_images=n_cc,
        )
    )
    if b.run_autoattack:
        specs.append(
            AttackSpec(
                f"autoattack-rand@{e:.3g}",
                CROSSCHECK,
                e,
                "torchattacks AutoAttack(version='rand'): APGD-CE + APGD-DLR, 10 steps, EOT 20, through MI-Combined",
                _batched(ctx, lambda x, y: crosscheck.autoattack_rand(mi, x, y, eps=e, gen=ctx.gen)),
                n_images=n_cc,
            )
        )
    return specs


def square_spec(ctx: Context) -> AttackSpec:
    """The score-based Square attack on the served MI-Combined outputs (needs no gradients, no twin)."""
    b, e = ctx.budget, ctx.threat.eps
    return AttackSpec(
        f"square@{e:.3g}",
        BLACKBOX,
        e,
        f"Square (score-based) on the served MI-Combined outputs, {b.square_queries} queries, fresh draws each",
        lambda c, x, y: torch.from_numpy(
            square.square_linf(
                c.scorer.fresh_probs,
                x.cpu().numpy(),
                y.cpu().numpy(),
                eps=e,
                queries=b.square_queries,
                gen=c.gen,
                progress=c.progress,
            )
        ),
    )


def score_inputs(ctx: Context, x_adv: NDArray[np.float32]) -> dict[str, SeedScores]:
    """Every served mode on the (8-bit) inputs, under every server seed."""
    return {str(m): ctx.scorer.score(x_adv, m) for m in SERVED_MODES}


def baseline_probs(ctx: Context, x: NDArray[np.float32]) -> dict[str, NDArray[np.float32]]:
    """Softmax averaged over ``baseline_draws`` random transforms, per baseline."""
    if ctx.mi is None:
        return {}
    tgen = torch.Generator().manual_seed(int(ctx.gen.integers(2**31)))
    xt = torch.from_numpy(x).to(ctx.mi.device)
    mi = ctx.mi
    return {
        name: predict_baseline(mi.logits, fn, xt, ctx.budget.baseline_draws, gen=tgen).cpu().numpy()
        for name, fn in BASELINES.items()
    }


def summarise(
    scores: dict[str, SeedScores],
    base: dict[str, NDArray[np.float32]],
    y: NDArray[np.int64],
    clean_gap: NDArray[np.float32] | None,
    target: NDArray[np.int64] | None = None,
) -> dict[str, Any]:
    """Accuracy per defence, flag rates, AUROC of the gap against clean, RIC and targeted success."""
    out: dict[str, Any] = {"accuracy": {}, "correct": {}}
    for mode, s in scores.items():
        correct = s.label == y[None]
        out["accuracy"][mode] = metrics.seed_accuracy(correct).as_dict()
        out["correct"][mode] = correct.all(axis=0)
    for name, p in base.items():
        correct = p.argmax(1) == y
        out["accuracy"][name] = metrics.seed_accuracy(correct[None]).as_dict()
        out["correct"][name] = correct
    comb = scores[str(Mode.COMBINED)]
    out["flag_rate"] = metrics.seed_rate(comb.flagged).as_dict()
    base_wrong = scores[str(Mode.OFF)].label[0] != y
    out["flag_rate_base_fooled"] = (
        metrics.seed_rate(comb.flagged[:, base_wrong]).as_dict() if base_wrong.any() else None
    )
    out["gap_auroc"] = metrics.auroc(clean_gap, comb.gap) if clean_gap is not None else None
    out["gap"] = comb.gap.ravel().tolist()
    plain = scores[str(Mode.OFF)].probs[0]
    out["ric"] = {
        str(m): metrics.robustness_improving_condition(plain, scores[str(m)].probs.mean(axis=0), y).as_dict()
        for m in (Mode.PL, Mode.OL, Mode.COMBINED)
    }
    if target is not None:
        out["target_success"] = {m: float((s.label == target[None]).any(axis=0).mean()) for m, s in scores.items()}
    return out


def _steps_of(spec: AttackSpec, b: Budget, n: int) -> int:
    """Progress units of one attack (PGD steps x restarts x batches, or queries)."""
    batches = -(-n // b.attack_batch)
    if spec.group == BLACKBOX:
        return b.square_queries - 1
    if spec.group == CROSSCHECK:
        return 0
    steps = {OBLIVIOUS: b.oblivious_steps, TRANSFER: b.transfer_steps, ADAPTIVE: b.adaptive_steps}[spec.group]
    return steps * (b.restarts if spec.group != TRANSFER else 1) * batches


def run_evaluation(
    bundle: Any,
    budget: Budget,
    *,
    seeds: list[int] | None = None,
    data_root: Path | None = None,
    only: tuple[str, ...] | None = None,
    eps: float | None = None,
    device: str = "cpu",
    show_progress: bool = True,
) -> dict[str, Any]:
    """Evaluate a loaded bundle (with weights) under ``budget``; returns the results (see ``report.write_report``).

    Args:
        bundle: a :class:`service.store.Bundle` loaded with ``require_weights=True``.
        budget: the named budget.
        seeds: server seeds of the scoring (default: ``budget.seeds`` fresh seeds from OS entropy, recorded).
        data_root: dataset directory (CIFAR, image folders).
        only: run only the attacks whose name starts with one of these prefixes.
        eps: override the headline eps of the targeted, transfer, adaptive, black-box and cross-check rows.
        device: torch device of the differentiable twin (gradients); scoring always runs the served ONNX engine on
            the CPU provider, so the numbers do not depend on it.
        show_progress: tqdm progress bars on stderr.
    """
    from tqdm import tqdm

    from service.robustness.data import load_split

    started = time.time()
    seeds = seeds if seeds is not None else [int(s) for s in np.random.SeedSequence().generate_state(budget.seeds)]
    gen = np.random.default_rng(np.random.SeedSequence())
    mi, blackbox_only = twin_or_reason(bundle, device)
    dev = mi.device if mi is not None else torch.device("cpu")
    scorer = ServedScorer.from_bundle(bundle, seeds)
    threat = threat_for(bundle.manifest.input.shape)
    if eps is not None:
        threat = replace(threat, eps=eps)
    ctx = Context(mi, scorer, budget, threat, gen)
    x_np, y_np, idx = load_split(bundle, "test", budget.n_images, data_root)
    x, y = torch.from_numpy(x_np).to(dev), torch.from_numpy(y_np).to(dev)
    targets = pgd.random_targets(y, bundle.manifest.n_classes, gen)
    targets_np = targets.cpu().numpy()

    clean_scores = score_inputs(ctx, x_np)
    clean = summarise(clean_scores, baseline_probs(ctx, x_np), y_np, None)
    clean_gap = clean_scores[str(Mode.COMBINED)].gap
    clean["gap_auroc"] = None
    warnings = checks.check_randomness(clean_scores[str(Mode.COMBINED)].label, budget.eot, len(seeds))
    if mi is not None:
        _, grad = eot_gradient(eot_combined.combined_loss(mi, gen), x, y, budget.eot, 8)
        warnings += checks.check_zero_gradients(grad.flatten(1).abs().sum(1).cpu().numpy())
    else:
        warnings.append(str(blackbox_only))

    rows: list[dict[str, Any]] = []
    plan = [s for s in attack_plan(ctx, targets) if only is None or s.name.startswith(only)]
    for spec in tqdm(plan, desc="attacks", unit="attack", disable=not show_progress):
        n = spec.n_images or budget.n_images
        t0 = time.time()
        with tqdm(total=_steps_of(spec, budget, n), desc=spec.name, leave=False, disable=not show_progress) as bar:
            ctx.progress = bar.update
            x_adv = quantize(spec.run(ctx, x[:n], y[:n]).to(x.device), x[:n], spec.eps).cpu().numpy()
        attack_s = time.time() - t0
        delta = np.abs(x_adv - x_np[:n]).max()
        if delta > spec.eps + 1e-6 or x_adv.min() < 0 or x_adv.max() > 1:
            raise AssertionError(f"{spec.name}: perturbation {delta} exceeds eps {spec.eps} or leaves [0, 1]")
        scores = score_inputs(ctx, x_adv)
        base = baseline_probs(ctx, x_adv) if spec.baselines else {}
        row = summarise(scores, base, y_np[:n], clean_gap[:, :n], targets_np[:n] if spec.targets else None)
        row.update(
            name=spec.name,
            group=spec.group,
            eps=spec.eps,
            description=spec.description,
            n_images=n,
            attack_seconds=round(attack_s, 1),
            max_perturbation=float(delta),
        )
        LOGGER.info(
            "%s: accuracy off %.3f, combined %.3f (all seeds %.3f), flagged %.3f, %.0f s",
            spec.name,
            row["accuracy"]["off"]["mean"],
            row["accuracy"]["combined"]["mean"],
            row["accuracy"]["combined"]["worst"],
            row["flag_rate"]["mean"],
            attack_s,
        )
        rows.append(row)

    worst = worst_case(rows, budget.n_images, threat.eps)
    acc_comb = {r["name"].split("@")[0]: r["accuracy"]["combined"]["worst"] for r in rows if r["eps"] == threat.eps}
    acc_comb["pgd"] = min(acc_comb.get("pgd-pred", 1.0), acc_comb.get("pgd-gt", 1.0))
    warnings += checks.check_adaptive_vs_oblivious(acc_comb, "pgd", ("eot-combined", "pl-aware", "ol-direct"))
    acc_ol = {r["name"].split("@")[0]: r["accuracy"]["ol"]["worst"] for r in rows if r["eps"] == threat.eps}
    acc_ol["pgd"] = min(acc_ol.get("pgd-pred", 1.0), acc_ol.get("pgd-gt", 1.0))
    warnings += checks.check_adaptive_vs_oblivious(acc_ol, "pgd", ("ol-standalone",), defence="MI-OL")
    warnings += checks.check_blackbox_vs_whitebox(
        acc_comb, "square", ("eot-combined", "pl-aware", "ol-direct", "transfer", "apgd-eot", "autoattack-rand")
    )
    for r in rows:
        r.pop("correct")
    clean.pop("correct")
    manifest = bundle.manifest
    return {
        "bundle": {
            "path": str(bundle.path),
            "name": manifest.name,
            "version": manifest.version,
            "architecture": manifest.architecture,
            "dataset": manifest.dataset.name,
            "mi": manifest.mi.model_dump(mode="json"),
            "training": manifest.recipe.training,
            "imported": manifest.imported.model_dump(mode="json") if manifest.imported else None,
        },
        "blackbox_only": blackbox_only,
        "budget": budget.as_dict(),
        "budget_text": budget.describe(),
        "threat": threat.as_dict(),
        "seeds": seeds,
        "test_indices": idx.tolist(),
        "clean": clean,
        "clean_gap": clean_gap.ravel().tolist(),
        "attacks": rows,
        "worst_case": worst,
        "warnings": warnings,
        "environment": environment(dev),
        "runtime_seconds": round(time.time() - started, 1),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def environment(device: torch.device) -> dict[str, Any]:
    """Where the numbers came from: the twin's device, the scoring runtime, library versions, the host."""
    import onnxruntime

    return {
        "torch_device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "scoring": "ONNX Runtime CPU provider",
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "host": f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical cores",
        "torch_threads": torch.get_num_threads(),
    }


def worst_case(rows: list[dict[str, Any]], n_images: int, eps: float) -> dict[str, Any]:
    """Per defence: an image is robust only if every attack at the headline eps, under every seed, got it right.

    Images outside an attack's subset (cross-checks) are judged by the attacks that ran on them.
    """
    at_eps = [r for r in rows if abs(r["eps"] - eps) < 1e-12]
    out: dict[str, Any] = {}
    for defence in (str(m) for m in SERVED_MODES):
        robust = np.ones(n_images, dtype=bool)
        adaptive = np.ones(n_images, dtype=bool)
        for r in at_eps:
            c = np.asarray(r["correct"][defence], dtype=bool)
            robust[: c.size] &= c
            if r["group"] in (ADAPTIVE, BLACKBOX, CROSSCHECK, TRANSFER):
                adaptive[: c.size] &= c
        out[defence] = {
            "all_attacks": float(robust.mean()),
            "non_oblivious": float(adaptive.mean()),
            "attacks": [r["name"] for r in at_eps],
        }
    return out

"""``mixinfer evaluate``: attack exactly what is served and score every adversarial input with the served engine.

Walk: load the bundle (same manifest, pool, N, lambda, threshold) -> torch twin for gradients -> test subset ->
attacks (:mod:`plan`: oblivious, transfer, adaptive, baselines with EOT, black-box, cross-check), each cached per
attack and seed (:mod:`cache`) -> served ONNX engine under several fresh seeds, on the 8-bit rounded and on the
float32 inputs (:mod:`scoring`) -> metrics -> checks -> ``results.json``, ``report.md`` and plots.
"""

from __future__ import annotations

import logging
import os
import platform
import time
import zlib
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from service.mi.params import Mode
from service.robustness import checks, scoring
from service.robustness.attacks import eot_combined, pgd
from service.robustness.attacks.core import eot_gradient, quantize
from service.robustness.budgets import Budget, threat_for
from service.robustness.cache import AttackCache
from service.robustness.pipeline import twin_or_reason
from service.robustness.plan import (
    ADAPTIVE,
    BASELINE_EOT,
    BLACKBOX,
    NON_OBLIVIOUS,
    TRANSFER,
    AttackSpec,
    Context,
    attack_plan,
)
from service.robustness.served import ServedScorer

LOGGER = logging.getLogger(__name__)

#: attack generator seed of a run unless given (fixed: a rerun reproduces the attacks and resumes from the cache)
DEFAULT_ATTACK_SEED = 0


def attack_generator(attack_seed: int, name: str) -> np.random.Generator:
    """The generator of one attack: seeded by the run's attack seed and the attack's name (independent of order)."""
    return np.random.default_rng([attack_seed, zlib.crc32(name.encode())])


def run_evaluation(
    bundle: Any,
    budget: Budget,
    *,
    seeds: list[int] | None = None,
    attack_seed: int = DEFAULT_ATTACK_SEED,
    data_root: Path | None = None,
    only: tuple[str, ...] | None = None,
    eps: float | None = None,
    device: str = "cpu",
    cache_dir: Path | None = None,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Evaluate a loaded bundle (with weights) under ``budget``; returns the results (see ``report.write_report``).

    Args:
        bundle: a :class:`service.store.Bundle` loaded with ``require_weights=True``.
        budget: the named budget.
        seeds: server seeds of the scoring (default: ``budget.seeds`` fresh seeds from OS entropy, recorded).
        attack_seed: root seed of every attack's generator (recorded; with the same seed a rerun reproduces).
        data_root: dataset directory (CIFAR, image folders).
        only: run only the attacks whose name starts with one of these prefixes.
        eps: override the headline eps of the targeted, transfer, adaptive, black-box and cross-check rows.
        device: torch device of the differentiable twin (gradients); scoring always runs the served ONNX engine on
            the CPU provider, so the numbers do not depend on it.
        cache_dir: where adversarial inputs are cached per attack and seed (None: no cache).
        show_progress: tqdm progress bars on stderr.
    """
    from tqdm import tqdm

    from service.robustness.data import load_split
    from service.robustness.surrogate import SURROGATE_SEED, train_surrogate

    started = time.time()
    seeds = seeds if seeds is not None else [int(s) for s in np.random.SeedSequence().generate_state(budget.seeds)]
    mi, blackbox_only = twin_or_reason(bundle, device)
    dev = mi.device if mi is not None else torch.device("cpu")
    scorer = ServedScorer.from_bundle(bundle, seeds)
    threat = threat_for(bundle.manifest.input.shape)
    if eps is not None:
        threat = replace(threat, eps=eps)
    x_np, y_np, idx = load_split(bundle, "test", budget.n_images, data_root)
    n = int(y_np.size)
    x, y = torch.from_numpy(x_np).to(dev), torch.from_numpy(y_np).to(dev)
    targets = pgd.random_targets(y, bundle.manifest.n_classes, attack_generator(attack_seed, "targets"))
    targets_np = targets.cpu().numpy()
    cache = AttackCache.for_run(cache_dir, bundle, budget, threat, idx)
    plan = [s for s in attack_plan(budget, threat, twin=mi is not None) if only is None or s.name.startswith(only)]
    surrogate, warnings = None, []
    train = bundle.splits.get("train")
    if train is None or len(train) == 0:
        plan = [s for s in plan if not s.name.startswith("transfer-surrogate")]
        warnings.append("no train split in the bundle: the surrogate transfer row is absent")
    if any(s.name.startswith("transfer-surrogate") for s in plan):
        surrogate = train_surrogate(
            bundle, epochs=budget.surrogate_epochs, cache_dir=cache_dir, data_root=data_root, device=dev
        )
    ctx = Context(mi, scorer, budget, threat, attack_generator(attack_seed, "setup"), surrogate)

    clean_scores = scoring.score_inputs(scorer, x_np)
    clean_base = scoring.baseline_probs(mi, x_np, budget.baseline_draws, ctx.gen)
    clean = scoring.summarise(clean_scores, clean_base, y_np, None)
    clean_gap = clean_scores[str(Mode.COMBINED)].gap
    warnings += checks.check_randomness(clean_scores[str(Mode.COMBINED)].label, budget.eot, len(seeds))
    if mi is not None:
        _, grad = eot_gradient(eot_combined.combined_loss(mi, ctx.gen), x, y, budget.eot, 8)
        warnings += checks.check_zero_gradients(grad.flatten(1).abs().sum(1).cpu().numpy())
    else:
        warnings.append(str(blackbox_only))

    rows: list[dict[str, Any]] = []
    for spec in tqdm(plan, desc="attacks", unit="attack", disable=not show_progress):
        rows.append(
            _run_attack(
                ctx,
                spec,
                cache=cache,
                attack_seed=attack_seed,
                x=x,
                y_np=y_np,
                targets_np=targets_np,
                clean_gap=clean_gap,
                show_progress=show_progress,
            )
        )

    warnings += _consistency_checks(rows, threat.eps)
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
        "budget_text": budget.describe(n),
        "threat": threat.as_dict(),
        "seeds": seeds,
        "attack_seed": attack_seed,
        "surrogate_seed": SURROGATE_SEED,
        "test_indices": idx.tolist(),
        "labels": y_np.tolist(),
        "targets": targets_np.tolist(),
        "clean": clean,
        "clean_gap": clean_gap.ravel().tolist(),
        "attacks": rows,
        "worst_case": scoring.worst_case(rows, n, threat.eps, NON_OBLIVIOUS, (BASELINE_EOT,)),
        "warnings": warnings,
        "environment": environment(dev),
        "runtime_seconds": round(time.time() - started, 1),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _run_attack(
    ctx: Context,
    spec: AttackSpec,
    *,
    cache: AttackCache,
    attack_seed: int,
    x: torch.Tensor,
    y_np: np.ndarray,
    targets_np: np.ndarray,
    clean_gap: np.ndarray,
    show_progress: bool,
) -> dict[str, Any]:
    """Run (or resume from the cache) one attack and score it, rounded and float."""
    from tqdm import tqdm

    seed = int(zlib.crc32(spec.name.encode()))
    ctx.gen = attack_generator(attack_seed, spec.name)
    ctx.traces = []
    x_np = x.cpu().numpy()
    cached = cache.load(spec.name, attack_seed)
    attack_s: float | None
    if cached is None:
        t0 = time.time()
        labels = torch.from_numpy(targets_np if spec.targets else y_np).to(x.device)
        with tqdm(desc=spec.name, leave=False, disable=not show_progress) as bar:
            ctx.progress = bar.update
            raw = spec.run(ctx, x, labels).detach().to(torch.float32).cpu().numpy()
        trace = ctx.trace()
        attack_s = time.time() - t0
        cache.save(spec.name, attack_seed, raw, trace, attack_s)
    else:
        raw, trace, attack_s = cached  # the seconds of the run that made the entry (None: not recorded)
    rounded = quantize(torch.from_numpy(raw), torch.from_numpy(x_np), spec.eps).numpy()
    for name, adv in (("rounded", rounded), ("float", raw)):
        delta = float(np.abs(adv - x_np).max())
        if delta > spec.eps + 1e-6 or adv.min() < 0 or adv.max() > 1:
            raise AssertionError(f"{spec.name} ({name}): perturbation {delta} exceeds eps {spec.eps} or leaves [0, 1]")
    scores = scoring.score_inputs(ctx.scorer, rounded)
    score_gen = attack_generator(attack_seed, f"{spec.name}/baselines")  # the same draws whether resumed or not
    base = scoring.baseline_probs(ctx.mi, rounded, ctx.budget.baseline_draws, score_gen) if spec.baselines else {}
    row = scoring.summarise(scores, base, y_np, clean_gap, targets_np if spec.targets else None)
    row["float"] = scoring.float_summary(scoring.score_inputs(ctx.scorer, raw), y_np)
    row.update(
        name=spec.name,
        group=spec.group,
        eps=spec.eps,
        description=spec.description,
        n_images=int(y_np.size),
        attack_seed=attack_seed,
        generator_key=seed,
        attack_seconds=round(attack_s, 1) if attack_s is not None else None,
        resumed=cached is not None,
        max_perturbation=float(np.abs(rounded - x_np).max()),
        trace=trace,
    )
    LOGGER.info(
        "%s: accuracy off %.3f, combined %.3f (all seeds %.3f), flagged %.3f, %.0f s",
        spec.name,
        row["accuracy"]["off"]["mean"],
        row["accuracy"]["combined"]["mean"],
        row["accuracy"]["combined"]["worst"],
        row["flag_rate"]["mean"],
        attack_s or 0.0,
    )
    return row


def _consistency_checks(rows: list[dict[str, Any]], eps: float) -> list[str]:
    """Adaptive vs oblivious on MI-Combined and MI-OL, black box vs white box."""
    at = [r for r in rows if r["eps"] == eps]
    acc_comb = {r["name"].split("@")[0]: r["accuracy"]["combined"]["worst"] for r in at}
    acc_comb["pgd"] = min(acc_comb.get("pgd-pred", 1.0), acc_comb.get("pgd-gt", 1.0))
    adaptive = tuple(r["name"].split("@")[0] for r in at if r["group"] == ADAPTIVE)
    warnings = checks.check_adaptive_vs_oblivious(acc_comb, "pgd", adaptive)
    acc_ol = {r["name"].split("@")[0]: r["accuracy"]["ol"]["worst"] for r in at}
    acc_ol["pgd"] = min(acc_ol.get("pgd-pred", 1.0), acc_ol.get("pgd-gt", 1.0))
    warnings += checks.check_adaptive_vs_oblivious(acc_ol, "pgd", ("ol-standalone",), defence="MI-OL")
    whitebox = tuple(r["name"].split("@")[0] for r in at if r["group"] in (ADAPTIVE, TRANSFER))
    for r in at:
        if r["group"] == BLACKBOX:
            warnings += checks.check_blackbox_vs_whitebox(acc_comb, r["name"].split("@")[0], whitebox)
    return warnings


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

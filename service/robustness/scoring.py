"""Score adversarial inputs with the served engine and the baselines; per-image, per-seed correctness kept.

Every number of a report is recomputable from ``results.json``: each row keeps ``correct[defence]`` as a
(seeds, images) 0/1 matrix (baselines: one row, their softmax averaged over random transforms) for the 8-bit
rounded inputs (what PNG clients can send) and ``correct_float`` for the unrounded float32 inputs (what tensor
clients can send through the OIP/JSON API).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from service.mi.params import Mode
from service.robustness import metrics
from service.robustness.baselines import BASELINES, predict_baseline
from service.robustness.pipeline import DifferentiableMI
from service.robustness.served import SERVED_MODES, SeedScores, ServedScorer

LOGGER = logging.getLogger(__name__)


def score_inputs(scorer: ServedScorer, x_adv: NDArray[np.float32]) -> dict[str, SeedScores]:
    """Every served mode on the inputs, under every server seed."""
    return {str(m): scorer.score(x_adv, m) for m in SERVED_MODES}


def baseline_probs(
    mi: DifferentiableMI | None, x: NDArray[np.float32], draws: int, gen: np.random.Generator
) -> dict[str, NDArray[np.float32]]:
    """Softmax averaged over ``draws`` random transforms, per baseline (none without a twin: imported graphs)."""
    if mi is None:
        return {}
    tgen = torch.Generator().manual_seed(int(gen.integers(2**31)))
    xt = torch.from_numpy(x).to(mi.device)
    return {name: predict_baseline(mi.logits, fn, xt, draws, gen=tgen).cpu().numpy() for name, fn in BASELINES.items()}


def correctness(
    scores: dict[str, SeedScores], base: dict[str, NDArray[np.float32]], y: NDArray[np.int64]
) -> dict[str, NDArray[np.bool_]]:
    """(seeds, images) correctness per served mode; (1, images) per baseline."""
    out = {mode: s.label == y[None] for mode, s in scores.items()}
    out |= {name: (p.argmax(1) == y)[None] for name, p in base.items()}
    return out


def summarise(
    scores: dict[str, SeedScores],
    base: dict[str, NDArray[np.float32]],
    y: NDArray[np.int64],
    clean_gap: NDArray[np.float32] | None,
    target: NDArray[np.int64] | None = None,
) -> dict[str, Any]:
    """Accuracy per defence (with intervals), flag rates, AUROC of the gap, RIC, targeted success, correctness."""
    correct = correctness(scores, base, y)
    out: dict[str, Any] = {
        "accuracy": {k: metrics.seed_accuracy(c).as_dict() for k, c in correct.items()},
        "correct": {k: c.astype(np.int8).tolist() for k, c in correct.items()},
    }
    comb = scores[str(Mode.COMBINED)]
    out["flag_rate"] = metrics.seed_rate(comb.flagged).as_dict()
    base_wrong = scores[str(Mode.OFF)].label[0] != y
    out["flag_rate_base_fooled"] = (
        metrics.seed_rate(comb.flagged[:, base_wrong]).as_dict() if base_wrong.any() else None
    )
    fooled = comb.label != y[None]
    out["gap_auroc"] = metrics.auroc(clean_gap, comb.gap) if clean_gap is not None else None
    out["gap_auroc_successful"] = (
        metrics.auroc(clean_gap, comb.gap[fooled]) if clean_gap is not None and fooled.any() else None
    )
    out["gap"] = comb.gap.ravel().tolist()
    plain = scores[str(Mode.OFF)].probs[0]
    out["ric"] = {
        str(m): metrics.robustness_improving_condition(plain, scores[str(m)].probs.mean(axis=0), y).as_dict()
        for m in (Mode.PL, Mode.OL, Mode.COMBINED)
    }
    if target is not None:
        out["target_success"] = {m: float((s.label == target[None]).any(axis=0).mean()) for m, s in scores.items()}
    return out


def float_summary(scores: dict[str, SeedScores], y: NDArray[np.int64]) -> dict[str, Any]:
    """Accuracy and correctness of the unrounded (float32) inputs, served modes only."""
    correct = correctness(scores, {}, y)
    return {
        "accuracy": {k: metrics.seed_accuracy(c).as_dict() for k, c in correct.items()},
        "correct": {k: c.astype(np.int8).tolist() for k, c in correct.items()},
    }


def worst_case(
    rows: list[dict[str, Any]],
    n_images: int,
    eps: float,
    non_oblivious: tuple[str, ...],
    baseline_groups: tuple[str, ...],
) -> dict[str, Any]:
    """Per defence: an image is robust only if every attack at the headline eps, under every seed, got it right.

    Computed twice: on the 8-bit rounded inputs (``correct``) and on the float32 inputs (``correct_float``; rows
    without float scores, the baselines, count with their rounded inputs). The second column counts only the groups
    that know the defence: ``non_oblivious`` for the served modes, ``baseline_groups`` for the baselines.
    """
    at_eps = [r for r in rows if abs(r["eps"] - eps) < 1e-12]
    found = {k for r in at_eps for k in r["correct"]}
    defences = [m for m in _MODES if m in found] + sorted(found - set(_MODES))
    out: dict[str, Any] = {}
    for defence in defences:
        entry: dict[str, Any] = {}
        knowing = non_oblivious if defence in _MODES else baseline_groups
        for key in ("correct", "correct_float"):
            robust = np.ones(n_images, dtype=bool)
            adaptive = np.ones(n_images, dtype=bool)
            attacks = []
            for r in at_eps:
                table = (r.get("float") or {}).get("correct", {}) if key == "correct_float" else r["correct"]
                cells = table.get(defence, r["correct"].get(defence))
                if cells is None:
                    continue
                attacks.append(r["name"])
                ok = np.asarray(cells, dtype=bool).all(axis=0)
                robust &= ok
                if r["group"] in knowing:
                    adaptive &= ok
            suffix = "" if key == "correct" else "_float"
            entry[f"all_attacks{suffix}"] = float(robust.mean())
            entry[f"all_attacks{suffix}_ci"] = metrics.clopper_pearson(int(robust.sum()), n_images)
            entry[f"non_oblivious{suffix}"] = float(adaptive.mean())
            entry["attacks"] = attacks
        out[defence] = entry
    return out


_MODES = tuple(str(m) for m in SERVED_MODES)

"""Numbers of the report: accuracy over seeds, flag rates, AUROC of the gap, the Robustness Improving Condition."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from numpy.typing import NDArray


@dataclass(frozen=True)
class SeedStats:
    """One quantity measured under several server seeds.

    Attributes:
        mean, std, min, max: over seeds.
        worst: the per-image worst case (an image counts only if every seed was right), for accuracies.
        per_seed: the value under each seed.
        ci: Clopper-Pearson 95 % interval of ``worst`` (accuracies) or of the pooled rate (rates).
    """

    mean: float
    std: float
    min: float
    max: float
    worst: float | None
    per_seed: list[float]
    ci: tuple[float, float] | None = None

    def as_dict(self) -> dict[str, object]:
        return asdict(self)

    def fmt(self, pct: bool = True) -> str:
        scale = 100.0 if pct else 1.0
        text = f"{self.mean * scale:.1f} ± {self.std * scale:.1f}"
        if self.worst is not None:
            text += f" (all seeds {self.worst * scale:.1f})"
        return text


def clopper_pearson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Exact (Clopper-Pearson) confidence interval of a binomial proportion k / n, via scipy."""
    if n == 0:
        return (0.0, 1.0)
    from scipy.stats import binomtest

    ci = binomtest(int(k), int(n)).proportion_ci(confidence_level=level, method="exact")
    return (float(ci.low), float(ci.high))


def seed_accuracy(correct: NDArray[np.bool_]) -> SeedStats:
    """Accuracy from a (S, N) matrix of per-seed, per-image correctness; worst = correct under every seed, with
    its Clopper-Pearson 95 % interval over the N images."""
    per = correct.mean(axis=1)
    robust = correct.all(axis=0)
    return SeedStats(
        float(per.mean()),
        float(per.std()),
        float(per.min()),
        float(per.max()),
        float(robust.mean()),
        [float(v) for v in per],
        clopper_pearson(int(robust.sum()), int(robust.size)),
    )


def seed_rate(values: NDArray[np.bool_] | NDArray[np.float64]) -> SeedStats:
    """Mean of a (S, N) matrix per seed (flag rates), no worst case."""
    arr = np.asarray(values, dtype=np.float64)
    per = arr.mean(axis=1)
    ci = clopper_pearson(int(arr.sum()), int(arr.size)) if arr.size and np.isin(arr, (0.0, 1.0)).all() else None
    return SeedStats(
        float(per.mean()), float(per.std()), float(per.min()), float(per.max()), None, [float(v) for v in per], ci
    )


def auroc(negatives: NDArray[np.floating], positives: NDArray[np.floating]) -> float:
    """Area under the ROC curve of a score (higher = positive), by the Mann-Whitney U statistic (ties count 1/2).

    Returns NaN when either class is empty.
    """
    neg = np.asarray(negatives, dtype=np.float64).ravel()
    pos = np.asarray(positives, dtype=np.float64).ravel()
    neg, pos = neg[np.isfinite(neg)], pos[np.isfinite(pos)]
    if neg.size == 0 or pos.size == 0:
        return float("nan")
    from scipy.stats import rankdata

    ranks = rankdata(np.concatenate([neg, pos]))
    u = ranks[neg.size :].sum() - pos.size * (pos.size + 1) / 2.0
    return float(u / (neg.size * pos.size))


def roc_curve(
    negatives: NDArray[np.floating], positives: NDArray[np.floating]
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """(FPR, TPR) at every threshold of the score (flag iff score >= threshold), from (0, 0) to (1, 1)."""
    neg = np.sort(np.asarray(negatives, dtype=np.float64).ravel())
    pos = np.sort(np.asarray(positives, dtype=np.float64).ravel())
    thresholds = np.unique(np.concatenate([neg, pos]))[::-1]
    fpr = 1.0 - np.searchsorted(neg, thresholds, side="left") / max(neg.size, 1)
    tpr = 1.0 - np.searchsorted(pos, thresholds, side="left") / max(pos.size, 1)
    return np.concatenate([[0.0], fpr, [1.0]]), np.concatenate([[0.0], tpr, [1.0]])


@dataclass(frozen=True)
class RIC:
    """The paper's Robustness Improving Condition, checked empirically on adversarial inputs.

    MI should raise the probability of the true class y and lower that of the adversarial class
    y_adv = the base model's (wrong) prediction on the adversarial input.

    Attributes:
        n: adversarial inputs the base model misclassifies (where the condition is defined).
        true_up: mean over them of q_MI[y] - p[y] (> 0 is what MI needs).
        adv_down: mean of p[y_adv] - q_MI[y_adv] (> 0 is what MI needs).
        holds: fraction of those inputs where both hold.
    """

    n: int
    true_up: float
    adv_down: float
    holds: float

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def robustness_improving_condition(
    base_probs: NDArray[np.float32], mi_probs: NDArray[np.float32], y: NDArray[np.int64]
) -> RIC:
    """RIC on the images the base model gets wrong; mi_probs may be averaged over seeds."""
    y_adv = base_probs.argmax(axis=1)
    wrong = np.flatnonzero(y_adv != y)
    if wrong.size == 0:
        return RIC(0, float("nan"), float("nan"), float("nan"))
    yw, aw = y[wrong], y_adv[wrong]
    up = mi_probs[wrong, yw] - base_probs[wrong, yw]
    down = base_probs[wrong, aw] - mi_probs[wrong, aw]
    return RIC(int(wrong.size), float(up.mean()), float(down.mean()), float(((up > 0) & (down > 0)).mean()))

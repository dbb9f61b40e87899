"""Threshold calibration and test accuracies, measured through the exported ONNX model and the real MI engine.

Protocol (recorded so the numbers can be recomputed exactly): a fresh :class:`MIEngine` over an
:class:`OrtBackend` on the CPU provider (host mixing) with ``seed``; the whole split goes through ONE engine call
(the backend chunks internally), one fresh engine per mode. Clean images are ``uint8 / 255`` as float32, exactly as
the server scales decoded pixels. The detection gap does not depend on the threshold, so the calibration gaps come
from one MI-PL pass; the flag rate at the chosen threshold is then ``is_flagged(gap, threshold)``, which is what
MI-Combined with the same seed flags.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

from service.mi.detection import is_flagged
from service.mi.params import MIParams, Mode

LOGGER = logging.getLogger(__name__)

#: quantiles of the clean gap recorded in the manifest (the three of service.manifest.GAP_QUANTILE_KEYS at least)
QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)
DEFAULT_TARGET_FPR = 0.05
DEFAULT_EVAL_SEED = 2020


def to_unit(images: NDArray[np.uint8]) -> NDArray[np.float32]:
    """uint8 (N, C, H, W) -> float32 in [0, 1] (``/ 255``, the server's scaling)."""
    return np.ascontiguousarray(images, dtype=np.float32) / np.float32(255.0)


class EngineFactory:
    """Builds fresh engines over one ONNX session (the backend is stateless; the randomness is the engine's).

    Args:
        model_bytes: the exported ``model.onnx``.
        pool_images, pool_labels: the bundle's pool (uint8 (P,C,H,W), int64 (P,) sorted).
        intra_op_threads: ONNX Runtime threads (None: ORT's default).
        input_name, output_name: the model's input and output (the manifest's ``input``).
    """

    def __init__(
        self,
        model_bytes: bytes,
        pool_images: NDArray[np.uint8],
        pool_labels: NDArray[np.int64],
        *,
        n_classes: int | None = None,
        intra_op_threads: int | None = None,
        input_name: str = "images",
        output_name: str = "logits",
    ) -> None:
        from service.backends.onnx import OrtBackend

        self.backend = OrtBackend(
            model_bytes,
            pool_images,
            providers=["CPUExecutionProvider"],
            mixing="host",
            intra_op_threads=intra_op_threads,
            expected_n_classes=n_classes,
            input_name=input_name,
            output_name=output_name,
        )
        self.pool_labels = np.asarray(pool_labels, dtype=np.int64)

    def engine(self, params: MIParams, seed: int) -> Any:
        from service.mi.engine import MIEngine

        return MIEngine(self.backend, self.pool_labels, params, seed=seed)


def choose_threshold(gaps: NDArray[np.float32], target_fpr: float) -> float:
    """The smallest threshold on a 1e-4 grid whose clean flag rate (gap >= threshold) is at most ``target_fpr``.

    Clamped to [0, 1] (the manifest's range); at 0 the measured rate may exceed the target, which is recorded.
    """
    if not 0.0 <= target_fpr <= 1.0:
        raise ValueError(f"target_fpr must be in [0, 1], got {target_fpr}")
    g = np.sort(np.asarray(gaps, dtype=np.float32))[::-1]
    allowed = math.floor(target_fpr * g.size + 1e-9)
    if allowed >= g.size:
        return 0.0
    boundary = float(g[allowed])  # the largest gap that must stay unflagged
    tau = math.floor(boundary * 1e4 + 1) / 1e4
    while tau <= 1.0 and np.mean(is_flagged(g, tau)) > target_fpr:  # guard float32 rounding at the grid point
        tau = round(tau + 1e-4, 4)
    return float(min(1.0, max(0.0, tau)))


def calibrate(
    factory: EngineFactory,
    images: NDArray[np.uint8],
    base: MIParams,
    *,
    seed: int,
    threshold: float | None = None,
    target_fpr: float = DEFAULT_TARGET_FPR,
    split: str = "calibration",
) -> tuple[MIParams, dict[str, Any]]:
    """Measure clean gaps on ``images`` and fix the threshold.

    Args:
        factory: engines over the exported model and pool.
        images: the clean calibration split, uint8.
        base: MI parameters (SPEC 4.4 defaults); only the threshold and its rule are replaced.
        seed: engine seed of the measurement.
        threshold: a fixed threshold (e.g. 0.2, the paper's); None calibrates to ``target_fpr``.
        target_fpr: the clean false-flag rate to stay at or under.

    Returns:
        The parameters with the chosen threshold and rule, and the manifest's ``calibration`` fields.
    """
    res = factory.engine(base, seed)(to_unit(images), Mode.PL)
    gaps = np.asarray(res.gap, dtype=np.float32)
    if threshold is None:
        tau = choose_threshold(gaps, target_fpr)
        rule = f"target_fpr={target_fpr:g}"
    else:
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {threshold}")
        tau, rule = float(threshold), f"fixed={threshold:g}"
    params = base.model_copy(update={"threshold": tau, "threshold_rule": rule})
    rate = float(np.mean(is_flagged(gaps, tau)))
    quantiles = {f"{q:g}": float(np.quantile(gaps, q)) for q in QUANTILES}
    LOGGER.info(
        "calibration on %d clean images (seed %d): gap mean %.4f sd %.4f, q05 %.4f q50 %.4f q95 %.4f; "
        "threshold %.4f (%s), clean flag rate %.4f",
        gaps.size,
        seed,
        float(gaps.mean()),
        float(gaps.std()),
        quantiles["0.05"],
        quantiles["0.5"],
        quantiles["0.95"],
        tau,
        rule,
        rate,
    )
    fields = {"split": split, "n_images": int(gaps.size), "seed": seed, "gap_quantiles": quantiles}
    fields["false_flag_rate"] = rate
    return params, fields


def gap_spread(
    factory: EngineFactory, images: NDArray[np.uint8], params: MIParams, seeds: Sequence[int]
) -> dict[str, float]:
    """Mean and spread over repeated draws (SPEC 5): per seed the mean gap and the flag rate at the threshold."""
    means, rates = [], []
    x = to_unit(images)
    for s in seeds:
        gap = factory.engine(params, s)(x, Mode.PL).gap
        means.append(float(np.mean(gap)))
        rates.append(float(np.mean(is_flagged(gap, params.threshold))))
    return {
        "gap_mean": float(np.mean(means)),
        "gap_mean_sd": float(np.std(means)),
        "flag_rate_mean": float(np.mean(rates)),
        "flag_rate_sd": float(np.std(rates)),
    }


def split_accuracy(
    factory: EngineFactory,
    images: NDArray[np.uint8],
    labels: NDArray[np.int64],
    params: MIParams,
    *,
    seed: int,
    split: str = "test",
) -> dict[str, Any]:
    """Accuracies of the plain model, MI-Combined, MI-PL and stand-alone MI-OL (one fresh engine each, ``seed``).

    Returns the manifest's ``accuracy`` fields; recomputing with the same files and seed gives the same numbers.
    """
    x = to_unit(images)
    y = np.asarray(labels, dtype=np.int64)
    out: dict[str, Any] = {"split": split, "n_images": int(y.size), "seed": seed}
    combined = factory.engine(params, seed)(x, Mode.COMBINED)
    out["plain"] = float(np.mean(combined.clean_probs.argmax(axis=1) == y))
    out["mi_combined"] = float(np.mean(combined.label == y))
    out["flag_rate"] = float(np.mean(combined.flagged))
    out["mi_pl"] = float(np.mean(factory.engine(params, seed)(x, Mode.PL).label == y))
    out["mi_ol"] = float(np.mean(factory.engine(params, seed)(x, Mode.OL).label == y))
    LOGGER.info(
        "accuracy on %d %s images (seed %d): plain %.4f, MI-Combined %.4f (flag rate %.4f), MI-PL %.4f, MI-OL %.4f",
        y.size,
        split,
        seed,
        out["plain"],
        out["mi_combined"],
        out["flag_rate"],
        out["mi_pl"],
        out["mi_ol"],
    )
    return out

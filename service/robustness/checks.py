"""Warn-don't-raise sanity checks of an evaluation, in the spirit of AutoAttack's ``checks.py``.

Each check returns human-readable warnings (also logged); none of them stops the run. A warning means a number
in the report is probably too optimistic and says what to do about it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
from numpy.typing import NDArray

LOGGER = logging.getLogger(__name__)

#: fraction of images whose EOT gradient is exactly zero above which gradients look masked
ZERO_GRAD_TOLERANCE = 0.05


def _warn(messages: list[str], text: str) -> None:
    LOGGER.warning("%s", text)
    messages.append(text)


def check_adaptive_vs_oblivious(
    acc: Mapping[str, float], oblivious: str, adaptive: tuple[str, ...], defence: str = "MI-Combined"
) -> list[str]:
    """Adaptive attacks should be at least as strong as the oblivious one on the defended model."""
    out: list[str] = []
    if oblivious not in acc:
        return out
    best = min((acc[a] for a in adaptive if a in acc), default=None)
    if best is not None and best > acc[oblivious] + 1e-9:
        _warn(
            out,
            f"adaptive attacks are weaker than the oblivious one on {defence} (best adaptive accuracy {best:.3f} > "
            f"oblivious {acc[oblivious]:.3f}): the adaptive attacks are probably under-optimised (more steps, EOT "
            "draws or restarts, or a different loss); treat the adaptive numbers as upper bounds",
        )
    return out


def check_blackbox_vs_whitebox(acc: Mapping[str, float], blackbox: str, whitebox: tuple[str, ...]) -> list[str]:
    """A score-based black-box attack should not beat white-box gradient attacks (a sign of gradient masking)."""
    out: list[str] = []
    if blackbox not in acc:
        return out
    best = min((acc[a] for a in whitebox if a in acc), default=None)
    if best is not None and acc[blackbox] < best - 1e-9:
        _warn(
            out,
            f"the black-box attack {blackbox!r} (accuracy {acc[blackbox]:.3f}) beats every white-box attack "
            f"(best {best:.3f}): gradients through MI may be masked or too noisy; raise EOT and steps",
        )
    return out


def check_zero_gradients(grad_norms: NDArray[np.floating]) -> list[str]:
    """Many exactly-zero EOT gradients at the clean inputs mean saturated or masked gradients."""
    out: list[str] = []
    zero = float(np.mean(np.asarray(grad_norms) == 0.0)) if np.size(grad_norms) else 0.0
    if zero > ZERO_GRAD_TOLERANCE:
        _warn(
            out,
            f"{zero:.0%} of the images have an exactly zero EOT gradient through MI-Combined at the clean input: "
            "the loss saturates (probabilities at 0/1 in float32) or gradients are masked; gradient attacks cannot "
            "move these images, use a margin loss or the black-box attack",
        )
    return out


def check_randomness(labels_per_seed: NDArray[np.int64], eot: int, seeds: int) -> list[str]:
    """Randomised outputs must be averaged over draws (EOT) when attacking and over seeds when scoring."""
    out: list[str] = []
    varies = (
        float(np.mean((labels_per_seed != labels_per_seed[:1]).any(axis=0))) if labels_per_seed.shape[0] > 1 else 0.0
    )
    if varies > 0 and eot < 2:
        _warn(
            out,
            f"MI's label changes between server seeds on {varies:.1%} of the clean images, but the attacks use "
            f"EOT {eot}: randomised outputs are not averaged, so the gradient attacks are too weak; use EOT >= 8",
        )
    if seeds < 3:
        _warn(out, f"only {seeds} server seed(s) score each adversarial input; SPEC 9.3 asks for >= 3")
    return out

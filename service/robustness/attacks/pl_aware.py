"""Detector-aware attack on the MI-PL branch (SPEC 9.3 item 2): misclassify while keeping the gap under tau.

Idea from Carlini and Wagner, "Adversarial Examples Are Not Easily Detected", AISec 2017: attack the classifier
and the detector jointly. Here the detector is MI-Combined's gap g = c - max q_PL; an input with g < tau is
answered by the PL branch, so the loss is CE(q_PL, y) - kappa * max(0, g - tau + margin), averaged over ``eot``
fresh PL draws per step. Threat model: white box, L-inf eps 0.3 (MNIST) or 8/255 (CIFAR), ground-truth labels.
Defaults: kappa 10, margin 0.05 (keeps the gap a little below the threshold so that fresh draws stay unflagged).

Shapes: x float32 (B, C, H, W) in [0, 1]; y int64 (B,); returns float32 (B, C, H, W).

Example:
    >>> x_adv = pl_aware_pgd(mi, x, y, eps=0.3, step=0.01, steps=200, eot=16, gen=np.random.default_rng())
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from service.mi.params import Mode
from service.robustness.attacks.core import DrawLoss, eot_pgd_linf
from service.robustness.attacks.eot_combined import ce_term
from service.robustness.pipeline import DifferentiableMI


def pl_aware_loss(
    mi: DifferentiableMI, gen: np.random.Generator, kappa: float, margin: float, targeted: bool = False
) -> DrawLoss:
    """Per-draw CE(q_PL) (see :func:`ce_term`) minus the hinge penalty on the gap, (draws, B)."""
    tau = mi.params.threshold

    def loss_fn(x: torch.Tensor, y: torch.Tensor, draws: int) -> torch.Tensor:
        out = mi(x, Mode.PL, draws=draws, gen=gen)
        assert out.gap is not None
        return ce_term(out.probs, y, targeted) - kappa * torch.relu(out.gap - tau + margin)

    return loss_fn


def pl_aware_pgd(
    mi: DifferentiableMI,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    gen: np.random.Generator,
    kappa: float = 10.0,
    margin: float = 0.05,
    targeted: bool = False,
    draw_chunk: int = 8,
    **pgd: Any,
) -> torch.Tensor:
    """Detector-aware EOT-PGD on the PL branch (keep-unflagged), untargeted or ``targeted`` towards ``y``.

    ``pgd``: eps, step, steps, eot, restarts, progress, trace (see :func:`core.eot_pgd_linf`).
    """
    loss_fn = pl_aware_loss(mi, gen, kappa, margin, targeted)
    return eot_pgd_linf(loss_fn, x, y, gen=gen, draw_chunk=draw_chunk, **pgd)

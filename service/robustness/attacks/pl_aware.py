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

from collections.abc import Callable

import numpy as np
import torch

from service.mi.params import Mode
from service.robustness.attacks.core import DrawLoss, eot_pgd_linf
from service.robustness.attacks.eot_combined import nll
from service.robustness.pipeline import DifferentiableMI


def pl_aware_loss(mi: DifferentiableMI, gen: np.random.Generator, kappa: float, margin: float) -> DrawLoss:
    """Per-draw CE(q_PL) minus the hinge penalty on the gap, (draws, B)."""
    tau = mi.params.threshold

    def loss_fn(x: torch.Tensor, y: torch.Tensor, draws: int) -> torch.Tensor:
        out = mi(x, Mode.PL, draws=draws, gen=gen)
        assert out.gap is not None
        return nll(out.probs, y) - kappa * torch.relu(out.gap - tau + margin)

    return loss_fn


def pl_aware_pgd(
    mi: DifferentiableMI,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    step: float,
    steps: int,
    eot: int,
    restarts: int = 1,
    kappa: float = 10.0,
    margin: float = 0.05,
    gen: np.random.Generator,
    draw_chunk: int = 8,
    progress: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Untargeted detector-aware EOT-PGD on the PL branch."""
    loss_fn = pl_aware_loss(mi, gen, kappa, margin)
    return eot_pgd_linf(
        loss_fn,
        x,
        y,
        eps=eps,
        step=step,
        steps=steps,
        eot=eot,
        restarts=restarts,
        gen=gen,
        draw_chunk=draw_chunk,
        progress=progress,
    )

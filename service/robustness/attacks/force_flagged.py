"""Force-flagged attack on MI-Combined: push the detection gap ABOVE tau so the OL branch answers, and fool it.

The opposite direction of :mod:`pl_aware` (keep-unflagged). MI-Combined answers an input with MI-OL when its gap
g = c - max q_PL reaches tau; where MI-OL alone is weak (Tramèr et al. break it), routing inputs into it is the
obvious adaptive move. Loss (maximised): CE(q_OL, y) - kappa * relu(tau + margin - g), averaged over ``eot`` fresh
PL and OL draws per step; the penalty vanishes once the gap is ``margin`` above tau, so fresh server draws still
flag the input. Paper: Tramèr, Carlini, Brendel, Madry, "On Adaptive Attacks to Adversarial Example Defenses",
NeurIPS 2020 (attack every decision of the defence; their section on MI breaks the OL branch; the detector-evading
loss follows Carlini and Wagner, AISec 2017). Threat model: white box, L-inf eps 0.3 (MNIST) or 8/255 (CIFAR),
ground-truth labels (or a target: ``targeted``). Defaults: kappa 10, margin 0.05 (as ``pl_aware``).

Shapes: x float32 (B, C, H, W) in [0, 1]; y int64 (B,); returns float32 (B, C, H, W).

Example:
    >>> x_adv = force_flagged_pgd(mi, x, y, eps=0.3, step=0.01, steps=100, eot=8, gen=np.random.default_rng())
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from service.robustness.attacks.core import DrawLoss, eot_pgd_linf
from service.robustness.attacks.eot_combined import ce_term
from service.robustness.pipeline import DifferentiableMI


def force_flagged_loss(
    mi: DifferentiableMI, gen: np.random.Generator, kappa: float, margin: float, targeted: bool = False
) -> DrawLoss:
    """Per-draw CE of the OL average (see :func:`ce_term`) minus the hinge keeping the gap above tau, (draws, B)."""
    tau = mi.params.threshold

    def loss_fn(x: torch.Tensor, y: torch.Tensor, draws: int) -> torch.Tensor:
        _, q_ol, gap = mi.branches(x, draws=draws, gen=gen)
        return ce_term(q_ol, y, targeted) - kappa * torch.relu(tau + margin - gap)

    return loss_fn


def force_flagged_pgd(
    mi: DifferentiableMI,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    gen: np.random.Generator,
    kappa: float = 10.0,
    margin: float = 0.05,
    targeted: bool = False,
    draw_chunk: int = 4,
    **pgd: Any,
) -> torch.Tensor:
    """EOT-PGD routing inputs into MI-Combined's OL branch and fooling it (untargeted or ``targeted`` to ``y``).

    ``pgd``: eps, step, steps, eot, restarts, progress, trace (see :func:`core.eot_pgd_linf`).
    """
    loss_fn = force_flagged_loss(mi, gen, kappa, margin, targeted)
    return eot_pgd_linf(loss_fn, x, y, gen=gen, draw_chunk=draw_chunk, **pgd)

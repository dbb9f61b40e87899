"""Smooth branch-switch attack on MI-Combined: a sigmoid relaxation of the detector's hard choice, annealed.

MI-Combined returns q_PL when g < tau and q_OL otherwise; the hard switch has no gradient, so EOT-PGD on the
returned probabilities never learns that crossing tau changes the answer. Here the returned distribution is
relaxed to q = (1 - w) q_PL + w q_OL with w = sigmoid((g - tau) / T), and T is annealed geometrically from
``t_start`` to ``t_end`` over the steps of each restart, so early steps see both branches and late steps the
served hard switch (Backward Pass Differentiable Approximation in spirit: Athalye, Carlini, Wagner, ICML 2018;
checklist: Tramèr et al., NeurIPS 2020). The kept iterate is chosen per image by the EOT mean CE of the HARD
(served) switch, so the relaxation never decides what is reported. Threat model: white box, L-inf, ground-truth
labels (or a target: ``targeted``). Defaults: T 0.1 -> 0.005 (the gap lives in [-1, 1]; tau is about 0.1-0.2).

Shapes: x float32 (B, C, H, W) in [0, 1]; y int64 (B,); returns float32 (B, C, H, W).

Example:
    >>> x_adv = smooth_switch_pgd(mi, x, y, eps=0.3, step=0.01, steps=100, eot=8, gen=np.random.default_rng())
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from service.robustness.attacks.core import DrawLoss, eot_mean, eot_pgd_linf
from service.robustness.attacks.eot_combined import ce_term
from service.robustness.pipeline import DifferentiableMI


class Temperature:
    """Geometric schedule t_start -> t_end over ``steps`` (``set(i)`` at step i; the value is ``.t``)."""

    def __init__(self, t_start: float, t_end: float, steps: int) -> None:
        self.t_start, self.t_end, self.steps = t_start, t_end, max(steps, 1)
        self.t = t_start

    def set(self, i: int) -> None:
        self.t = self.t_start * (self.t_end / self.t_start) ** (min(i, self.steps) / self.steps)


def switch_loss(
    mi: DifferentiableMI, gen: np.random.Generator, temperature: Temperature | None, targeted: bool = False
) -> DrawLoss:
    """Per-draw CE of the relaxed mixture (``temperature``) or of the hard served switch (None), (draws, B)."""
    tau = mi.params.threshold

    def loss_fn(x: torch.Tensor, y: torch.Tensor, draws: int) -> torch.Tensor:
        q_pl, q_ol, gap = mi.branches(x, draws=draws, gen=gen)
        w = (gap >= tau).to(q_pl.dtype) if temperature is None else torch.sigmoid((gap - tau) / temperature.t)
        q = (1.0 - w).unsqueeze(2) * q_pl + w.unsqueeze(2) * q_ol
        return ce_term(q, y, targeted)

    return loss_fn


def smooth_switch_pgd(
    mi: DifferentiableMI,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    gen: np.random.Generator,
    eot: int,
    steps: int,
    t_start: float = 0.1,
    t_end: float = 0.005,
    targeted: bool = False,
    draw_chunk: int = 4,
    **pgd: Any,
) -> torch.Tensor:
    """EOT-PGD on the annealed relaxation of MI-Combined's switch; best iterate by the hard switch's loss.

    ``pgd``: eps, step, restarts, progress, trace (see :func:`core.eot_pgd_linf`).
    """
    temperature = Temperature(t_start, t_end, steps)
    hard = switch_loss(mi, gen, None, targeted)
    return eot_pgd_linf(
        switch_loss(mi, gen, temperature, targeted),
        x,
        y,
        gen=gen,
        eot=eot,
        steps=steps,
        draw_chunk=draw_chunk,
        on_step=temperature.set,
        select=lambda xa, ya: eot_mean(hard, xa, ya, eot, draw_chunk),
        **pgd,
    )

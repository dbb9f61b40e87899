"""EOT-PGD through the full MI-Combined pipeline (SPEC 9.3 item 1): the adaptive attack MI must survive.

Paper: Athalye, Carlini, Wagner, "Obfuscated Gradients Give a False Sense of Security", ICML 2018 (EOT), applied
to MI as Tramèr, Carlini, Brendel, Madry, "On Adaptive Attacks to Adversarial Example Defenses", NeurIPS 2020 advise.
Threat model: white box (weights, pool, lambda, N, threshold known; the server's draws are not), L-inf eps 0.3
(MNIST) or 8/255 (CIFAR), ground-truth labels. Every step draws ``eot`` fresh, independent sets of pool partners
(PL partners from the current predicted class, OL partners for the draws the detector flags), runs the whole
Combined pipeline on all of them in one batch, and ascends the mean cross-entropy of the returned probabilities.
Defaults (``paper`` budget): 200 steps, step 1/255, EOT 16, 5 restarts.

Shapes: x float32 (B, C, H, W) in [0, 1]; y int64 (B,); returns float32 (B, C, H, W).

Example:
    >>> x_adv = eot_pgd_combined(mi, x, y, eps=0.3, step=0.01, steps=200, eot=16, gen=np.random.default_rng())
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from service.mi.params import Mode
from service.robustness.attacks.core import DrawLoss, eot_pgd_linf
from service.robustness.pipeline import DifferentiableMI

#: floor inside the log of averaged probabilities (they can be exactly 0 in float32)
PROB_FLOOR = 1e-12


def nll(probs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """-log probs[..., y] for probs (E, B, K), y (B,) -> (E, B)."""
    picked = probs.gather(2, y.view(1, -1, 1).expand(probs.shape[0], -1, 1)).squeeze(2)
    return -torch.log(picked.clamp_min(PROB_FLOOR))


def ce_term(probs: torch.Tensor, y: torch.Tensor, targeted: bool) -> torch.Tensor:
    """The classification part of every adaptive loss, to maximise, (E, B): CE away from ``y`` (untargeted) or
    minus CE towards the target ``y`` (targeted)."""
    return -nll(probs, y) if targeted else nll(probs, y)


def combined_loss(mi: DifferentiableMI, gen: np.random.Generator, targeted: bool = False) -> DrawLoss:
    """Per-draw cross-entropy of what MI-Combined returns, (draws, B) (see :func:`ce_term` for ``targeted``)."""

    def loss_fn(x: torch.Tensor, y: torch.Tensor, draws: int) -> torch.Tensor:
        return ce_term(mi(x, Mode.COMBINED, draws=draws, gen=gen).probs, y, targeted)

    return loss_fn


def eot_pgd_combined(
    mi: DifferentiableMI,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    gen: np.random.Generator,
    targeted: bool = False,
    draw_chunk: int = 8,
    **pgd: Any,
) -> torch.Tensor:
    """EOT-PGD on MI-Combined's returned probabilities: away from ``y`` or, ``targeted``, towards it.

    ``pgd``: eps, step, steps, eot, restarts, progress, trace (see :func:`core.eot_pgd_linf`).
    """
    return eot_pgd_linf(combined_loss(mi, gen, targeted), x, y, gen=gen, draw_chunk=draw_chunk, **pgd)

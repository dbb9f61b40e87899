"""Direct attack on the MI-OL branch (SPEC 9.3 item 3), as Tramèr et al. broke MI-OL.

Paper: Tramèr, Carlini, Brendel, Madry, "On Adaptive Attacks to Adversarial Example Defenses", NeurIPS 2020,
section on Mixup Inference: differentiate through MI-OL with EOT. Their setup: IAT model, N_OL 15, lambda_OL 0.6,
50 PGD steps of 0.5/255, eps 8/255. We attack the OL branch that the served MI-Combined uses for flagged inputs
(the manifest's ``ol_combined`` lambda and N; pass ``ol_spec`` for the stand-alone one), assuming the input will be
flagged, with fresh OL draws (other classes than the current prediction) every step. Threat model: white box,
L-inf, ground-truth labels.

Shapes: x float32 (B, C, H, W) in [0, 1]; y int64 (B,); returns float32 (B, C, H, W).

Example:
    >>> x_adv = ol_direct_pgd(mi, x, y, eps=8/255, step=0.5/255, steps=50, eot=16, gen=np.random.default_rng())
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from service.mi.params import MixSpec, Mode
from service.robustness.attacks.core import DrawLoss, eot_pgd_linf
from service.robustness.attacks.eot_combined import ce_term
from service.robustness.pipeline import DifferentiableMI


def ol_loss(mi: DifferentiableMI, gen: np.random.Generator, spec: MixSpec, targeted: bool = False) -> DrawLoss:
    """Per-draw CE of the MI-OL average (see :func:`ce_term`), (draws, B)."""

    def loss_fn(x: torch.Tensor, y: torch.Tensor, draws: int) -> torch.Tensor:
        return ce_term(mi(x, Mode.OL, draws=draws, gen=gen, ol_spec=spec).probs, y, targeted)

    return loss_fn


def ol_direct_pgd(
    mi: DifferentiableMI,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    gen: np.random.Generator,
    ol_spec: MixSpec | None = None,
    targeted: bool = False,
    draw_chunk: int = 4,
    **pgd: Any,
) -> torch.Tensor:
    """EOT-PGD on MI-OL (default: the branch MI-Combined answers flagged inputs with), untargeted or ``targeted``.

    ``pgd``: eps, step, steps, eot, restarts, progress, trace (see :func:`core.eot_pgd_linf`).
    """
    loss_fn = ol_loss(mi, gen, ol_spec if ol_spec is not None else mi.params.ol_combined, targeted)
    return eot_pgd_linf(loss_fn, x, y, gen=gen, draw_chunk=draw_chunk, **pgd)

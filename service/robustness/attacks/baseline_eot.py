"""EOT-PGD through an input-transformation baseline's randomness (the baselines attacked adaptively, not only
obliviously).

Paper: Athalye, Carlini, Wagner, "Obfuscated Gradients Give a False Sense of Security", ICML 2018 (EOT broke the
random-transformation defences of Xie et al. and Guo et al.). Each step averages the cross-entropy of the base
model on ``eot`` fresh random transforms (Gaussian noise, rotation, crop+pad, crop+resize: all differentiable in
the input) and ascends its gradient. Threat model: white box (model and transform family known, the draws not),
L-inf eps, ground-truth labels. Defaults: the budget's adaptive steps and EOT draws.

Shapes: x float32 (B, C, H, W) in [0, 1]; y int64 (B,); returns float32 (B, C, H, W).

Example:
    >>> x_adv = baseline_eot_pgd(model, BASELINES["rotation"], x, y, eps=0.3, step=0.01, steps=100, eot=8, gen=g)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from service.robustness.attacks.core import DrawLoss, eot_pgd_linf
from service.robustness.baselines import Transform


def baseline_loss(
    logits_fn: Callable[[torch.Tensor], torch.Tensor], transform: Transform, gen: torch.Generator
) -> DrawLoss:
    """Per-draw CE of the base model on a fresh random transform of the input, (draws, B)."""

    def loss_fn(x: torch.Tensor, y: torch.Tensor, draws: int) -> torch.Tensor:
        b = x.shape[0]
        logits = logits_fn(transform(x.repeat(draws, 1, 1, 1), gen))
        return torch.nn.functional.cross_entropy(logits, y.repeat(draws), reduction="none").view(draws, b)

    return loss_fn


def baseline_eot_pgd(
    logits_fn: Callable[[torch.Tensor], torch.Tensor],
    transform: Transform,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    gen: np.random.Generator,
    draw_chunk: int = 8,
    **pgd: Any,
) -> torch.Tensor:
    """Untargeted EOT-PGD on the softmax-averaging baseline ``transform``.

    ``pgd``: eps, step, steps, eot, restarts, progress, trace (see :func:`core.eot_pgd_linf`).
    """
    tgen = torch.Generator().manual_seed(int(gen.integers(2**31)))
    return eot_pgd_linf(baseline_loss(logits_fn, transform, tgen), x, y, gen=gen, draw_chunk=draw_chunk, **pgd)

"""Oblivious L-inf PGD on the base model (the paper's protocol): untargeted and targeted.

Paper: Madry et al., "Towards Deep Learning Models Resistant to Adversarial Attacks", ICLR 2018; used obliviously
as in Pang, Xu, Zhu, "Mixup Inference", ICLR 2020, section 4: the attack sees only the base network, never MI.
Threat model: L-inf, eps 8/255 (CIFAR) or 0.1/0.2/0.3 (MNIST) in [0, 1] units, one uniform random start,
cross-entropy loss. Untargeted pushes away from ``y`` (the clean prediction in the paper; the ground truth as well
in ours, and the report takes the worse); targeted minimises the cross-entropy to a random other class.

Shapes: x float32 (B, C, H, W) in [0, 1]; y, target int64 (B,); returns float32 (B, C, H, W).

Example:
    >>> x_adv = pgd_untargeted(model, x, y, eps=0.3, step=0.01, steps=100)
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from service.robustness.attacks.core import GradFn, pgd_linf


def ce_grad(logits_fn: Callable[[torch.Tensor], torch.Tensor]) -> GradFn:
    """Per-image cross-entropy of a logits function and its input gradient."""

    def grad_fn(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        xg = x.detach().clone().requires_grad_(True)
        loss = torch.nn.functional.cross_entropy(logits_fn(xg), y, reduction="none")
        (grad,) = torch.autograd.grad(loss.sum(), xg)
        return loss.detach(), grad

    return grad_fn


def pgd_untargeted(
    logits_fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    step: float,
    steps: int,
    restarts: int = 1,
    gen: torch.Generator | None = None,
    progress: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Maximise CE(f(x_adv), y) over the eps-ball (oblivious: ``logits_fn`` is the base model)."""
    return pgd_linf(
        x, y, ce_grad(logits_fn), eps=eps, step=step, steps=steps, restarts=restarts, gen=gen, progress=progress
    )


def random_targets(y: torch.Tensor, n_classes: int, gen: np.random.Generator) -> torch.Tensor:
    """One target per image, uniform over the classes other than ``y`` (closed form, no rejection loop)."""
    u = gen.integers(0, n_classes - 1, size=y.shape[0])
    return (y + 1 + torch.from_numpy(u).to(y.device)) % n_classes


def pgd_targeted(
    logits_fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    target: torch.Tensor,
    *,
    eps: float,
    step: float,
    steps: int,
    restarts: int = 1,
    gen: torch.Generator | None = None,
    progress: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Minimise CE(f(x_adv), target) over the eps-ball."""
    return pgd_linf(
        x,
        target,
        ce_grad(logits_fn),
        eps=eps,
        step=step,
        steps=steps,
        restarts=restarts,
        targeted=True,
        gen=gen,
        progress=progress,
    )

"""The L-inf PGD loop, the EOT gradient and EOT-PGD, the eps-ball projection and the 8-bit rounding shared by the
attacks."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeAlias

import numpy as np
import torch

LOGGER = logging.getLogger(__name__)

#: loss_fn(x, y, draws) -> (draws, B) per-draw, per-image loss to MAXIMISE (untargeted convention)
DrawLoss: TypeAlias = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]
#: grad_fn(x, y) -> (loss (B,), gradient (B, C, H, W)) of the objective to maximise
GradFn: TypeAlias = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def project(x_adv: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    """Clip ``x_adv`` into the L-inf ball of radius ``eps`` around ``x`` and into [0, 1]."""
    return torch.minimum(torch.maximum(x_adv, x - eps), x + eps).clamp_(0.0, 1.0)


def quantize(x_adv: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    """Round to 8-bit pixels while staying within ``eps`` of ``x`` and in [0, 1].

    Works on any device. ``x`` must lie on the 8-bit grid (it comes from uint8 images); the perturbation is rounded in
    whole grey levels and clipped to ``floor(eps * 255)`` levels, so rounding can never leave the ball.
    """
    x255 = torch.round(x * 255.0)
    limit = float(torch.floor(torch.tensor(eps * 255.0 + 1e-6)))
    delta = torch.round(x_adv * 255.0 - x255).clamp_(-limit, limit)
    return ((x255 + delta).clamp_(0.0, 255.0) / 255.0).to(torch.float32)


def eot_gradient(
    loss_fn: DrawLoss, x: torch.Tensor, y: torch.Tensor, eot: int, chunk: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Expectation over Transformation: the mean over ``eot`` independent draws of the loss and of its gradient.

    Draws are batched ``chunk`` at a time (one forward/backward per chunk); gradients are accumulated, which is
    exact because the mean is linear. Memory is bounded by ``chunk`` x B x N blends.

    Returns:
        (mean loss (B,), mean gradient (B, C, H, W)).
    """
    total_loss = torch.zeros(x.shape[0], device=x.device)
    total_grad = torch.zeros_like(x)
    done = 0
    while done < eot:
        n = min(chunk, eot - done)
        xg = x.detach().clone().requires_grad_(True)
        losses = loss_fn(xg, y, n)  # (n, B)
        (grad,) = torch.autograd.grad(losses.sum(), xg)
        total_loss += losses.detach().sum(dim=0)
        total_grad += grad
        done += n
    return total_loss / eot, total_grad / eot


def pgd_linf(
    x: torch.Tensor,
    y: torch.Tensor,
    grad_fn: GradFn,
    *,
    eps: float,
    step: float,
    steps: int,
    restarts: int = 1,
    targeted: bool = False,
    gen: torch.Generator | None = None,
    progress: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """L-inf PGD (Madry et al. 2018) with uniform random starts; keeps, per image, the strongest restart.

    Args:
        x: float32 (B, C, H, W) clean images in [0, 1].
        y: int64 (B,) labels to move away from (untargeted) or towards (targeted).
        grad_fn: objective (to maximise in the untargeted sense) and its gradient; for ``targeted`` the step
            descends the objective, which should then be the loss towards ``y``.
        eps: L-inf radius in [0, 1] units.
        step: signed-gradient step size.
        steps: iterations per restart.
        restarts: random restarts (>= 1).
        targeted: descend instead of ascend.
        gen: torch generator of the random starts.
        progress: called with 1 after every step (progress bars).

    Returns:
        float32 (B, C, H, W), within eps of x and in [0, 1] (not yet rounded to 8 bits).
    """
    sign = -1.0 if targeted else 1.0
    best = x.clone()
    best_obj = torch.full((x.shape[0],), -float("inf"), device=x.device)
    for _ in range(restarts):
        noise = (torch.rand(x.shape, generator=gen).to(x.device) * 2.0 - 1.0) * eps
        x_adv = project(x + noise, x, eps)
        for _ in range(steps):
            _, grad = grad_fn(x_adv, y)
            x_adv = project(x_adv + sign * step * grad.sign(), x, eps)
            if progress is not None:
                progress(1)
        loss, _ = grad_fn(x_adv, y)
        obj = sign * loss
        better = obj > best_obj
        best[better] = x_adv[better]
        best_obj = torch.where(better, obj, best_obj)
    return best


def eot_pgd_linf(
    loss_fn: DrawLoss,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    step: float,
    steps: int,
    eot: int,
    restarts: int,
    gen: np.random.Generator,
    draw_chunk: int,
    progress: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Untargeted :func:`pgd_linf` ascending the :func:`eot_gradient` of ``loss_fn`` (``eot`` draws per step).

    The random starts come from a torch generator seeded with one draw of ``gen``; ``loss_fn`` keeps drawing
    its partners from ``gen`` itself.
    """
    tgen = torch.Generator().manual_seed(int(gen.integers(2**31)))
    return pgd_linf(
        x,
        y,
        lambda xa, ya: eot_gradient(loss_fn, xa, ya, eot, draw_chunk),
        eps=eps,
        step=step,
        steps=steps,
        restarts=restarts,
        gen=tgen,
        progress=progress,
    )

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


#: select(x, y) -> (B,) objective (no gradient) deciding which iterate to keep per image; higher is better
SelectFn: TypeAlias = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
#: called with the step index (0 .. steps; ``steps`` is the final evaluation) before each objective evaluation
StepHook: TypeAlias = Callable[[int], None]


def random_start(x: torch.Tensor, eps: float, gen: torch.Generator | None) -> torch.Tensor:
    """Uniform random point of the eps-ball around ``x`` (clipped to [0, 1])."""
    noise = (torch.rand(x.shape, generator=gen).to(x.device) * 2.0 - 1.0) * eps
    return project(x + noise, x, eps)


class BestIterate:
    """Per-image best iterate over every step and every restart (not the last iterate of the last restart).

    ``offer(x_adv, obj)`` keeps, per image, the input whose objective (to maximise) is the highest seen so far.
    ``history`` records the batch-mean objective of every offer (the loss curve, restarts concatenated).
    """

    def __init__(self, x: torch.Tensor) -> None:
        self.x = x.clone()
        self.obj = torch.full((x.shape[0],), -float("inf"), device=x.device)
        self.history: list[float] = []

    def offer(self, x_adv: torch.Tensor, obj: torch.Tensor) -> None:
        obj = obj.detach().to(self.obj.device)
        better = obj > self.obj
        self.x[better] = x_adv.detach()[better]
        self.obj = torch.where(better, obj, self.obj)
        self.history.append(float(obj[torch.isfinite(obj)].mean()) if torch.isfinite(obj).any() else float("nan"))


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
    select: SelectFn | None = None,
    on_step: StepHook | None = None,
    trace: list[float] | None = None,
    start: torch.Tensor | None = None,
) -> torch.Tensor:
    """L-inf PGD (Madry et al. 2018) with uniform random starts, keeping per image the best iterate.

    Every iterate of every restart (the random start included) is a candidate: per image the one with the highest
    objective wins (``select`` when given, else the signed loss ``grad_fn`` returns at that iterate, which costs
    nothing extra: the loss comes with the gradient).

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
        select: objective choosing the kept iterate (e.g. the hard-switch loss of a relaxed attack).
        on_step: called with the step index before each objective evaluation (annealing schedules).
        trace: if given, the batch-mean objective of every iterate is appended (loss curves).
        start: the first restart starts here (projected into the ball) instead of at a random point, e.g. where
            another attack ended (a warm start); the other restarts start at random. It is a candidate too.

    Returns:
        float32 (B, C, H, W), within eps of x and in [0, 1] (not yet rounded to 8 bits).
    """
    sign = -1.0 if targeted else 1.0
    best = BestIterate(x)
    for r in range(restarts):
        x_adv = project(start.clone(), x, eps) if start is not None and r == 0 else random_start(x, eps, gen)
        for i in range(steps + 1):
            if on_step is not None:
                on_step(i)
            loss, grad = grad_fn(x_adv, y)
            best.offer(x_adv, select(x_adv, y) if select is not None else sign * loss)
            if i == steps:
                break
            x_adv = project(x_adv + sign * step * grad.sign(), x, eps)
            if progress is not None:
                progress(1)
    if trace is not None:
        trace.extend(best.history)
    return best.x


def eot_pgd_linf(
    loss_fn: DrawLoss,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    step: float,
    steps: int,
    eot: int,
    restarts: int = 1,
    gen: np.random.Generator,
    draw_chunk: int = 8,
    progress: Callable[[int], None] | None = None,
    select: SelectFn | None = None,
    on_step: StepHook | None = None,
    trace: list[float] | None = None,
    start: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`pgd_linf` ascending the :func:`eot_gradient` of ``loss_fn`` (``eot`` draws per step).

    ``loss_fn`` is always maximised (targeted losses are written as minus the loss towards the target). The random
    starts come from a torch generator seeded with one draw of ``gen``; ``loss_fn`` keeps drawing its partners from
    ``gen`` itself.
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
        select=select,
        on_step=on_step,
        trace=trace,
        start=start,
    )


@torch.no_grad()
def eot_mean(loss_fn: DrawLoss, x: torch.Tensor, y: torch.Tensor, eot: int, chunk: int) -> torch.Tensor:
    """The mean over ``eot`` draws of a per-draw loss, without gradients, (B,)."""
    total = torch.zeros(x.shape[0], device=x.device)
    done = 0
    while done < eot:
        n = min(chunk, eot - done)
        total += loss_fn(x, y, n).sum(dim=0)
        done += n
    return total / eot

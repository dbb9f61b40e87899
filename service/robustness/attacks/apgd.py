"""APGD with EOT, written here: every image attacked, the best iterate kept (no torchattacks shortcuts).

Paper: Croce and Hein, "Reliable evaluation of adversarial robustness with an ensemble of diverse parameter-free
attacks", ICML 2020, Algorithm 1 (L-inf): step size 2 eps, momentum alpha 0.75 after the first step, checkpoints
w_j = ceil(p_j N) with p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06); at a checkpoint the
step size of an image halves (and it restarts from its best point) if fewer than rho = 0.75 of the steps since the
last checkpoint raised its loss, or if its step size and best loss did not change since the last checkpoint.
The loss and its gradient are EOT means over ``eot`` fresh draws (any :data:`core.DrawLoss`, maximised: CE
through MI-Combined by default in the evaluation, or the force-flagged loss).

Why not torchattacks 3.5.1's APGD: it only attacks the images that one random clean forward classifies correctly
(the others come back unperturbed although other draws may answer them right) and returns the clean input for
images that no draw misclassified during the run. Here every image is attacked and the iterate with the highest
EOT loss over every step and restart is returned. Threat model: white box, L-inf eps, ground-truth labels.
Defaults: 100 steps, 1 restart, EOT as the budget's.

Shapes: x float32 (B, C, H, W) in [0, 1]; y int64 (B,); returns float32 (B, C, H, W).

Example:
    >>> x_adv = apgd_eot(combined_loss(mi, gen), x, y, eps=0.3, steps=100, eot=8, gen=gen)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import numpy as np
import torch

from service.robustness.attacks.core import BestIterate, DrawLoss, eot_gradient, project

#: momentum weight of the new step (Croce and Hein's alpha)
ALPHA = 0.75
#: fraction of loss-raising steps below which a checkpoint halves the step size
RHO = 0.75


def checkpoints(steps: int) -> list[int]:
    """The iterations at which APGD checks its progress: ceil(p_j * steps) for p_j <= 1, j >= 1."""
    p = [0.0, 0.22]
    while p[-1] + max(p[-1] - p[-2] - 0.03, 0.06) <= 1.0:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    return sorted({math.ceil(v * steps - 1e-9) for v in p[1:] if v * steps > 1e-9})


def _run_once(
    grad_fn: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    x: torch.Tensor,
    *,
    eps: float,
    steps: int,
    gen: torch.Generator,
    best: BestIterate,
    progress: Callable[[int], None] | None,
) -> None:
    """One APGD run from a random point of the ball's surface; every iterate is offered to ``best``."""
    b = x.shape[0]
    shape = (b,) + (1,) * (x.dim() - 1)
    t = torch.rand(x.shape, generator=gen).to(x.device) * 2.0 - 1.0
    x_adv = project(x + eps * t / t.flatten(1).abs().amax(1).clamp_min(1e-12).view(shape), x, eps)
    loss, grad = grad_fn(x_adv)
    best.offer(x_adv, loss)
    x_best, loss_best, grad_best = x_adv.clone(), loss.clone(), grad.clone()
    eta = torch.full(shape, 2.0 * eps, device=x.device)
    x_prev = x_adv.clone()
    marks = set(checkpoints(steps))
    last_mark, raised = 0, torch.zeros(b, device=x.device)
    eta_at_mark, best_at_mark = eta.clone(), loss_best.clone()
    prev_loss = loss
    for k in range(steps):
        z = project(x_adv + eta * grad.sign(), x, eps)
        a = ALPHA if k > 0 else 1.0
        x_new = project(x_adv + a * (z - x_adv) + (1.0 - a) * (x_adv - x_prev), x, eps)
        x_prev, x_adv = x_adv, x_new
        loss, grad = grad_fn(x_adv)
        best.offer(x_adv, loss)
        raised += (loss > prev_loss).float()
        prev_loss = loss
        up = loss > loss_best
        x_best[up], loss_best[up], grad_best[up] = x_adv[up], loss[up], grad[up]
        if progress is not None:
            progress(1)
        if k + 1 in marks:
            too_few = raised < RHO * (k + 1 - last_mark)
            stalled = (eta.view(b) == eta_at_mark.view(b)) & (loss_best <= best_at_mark)
            halve = too_few | stalled
            eta_at_mark, best_at_mark = eta.clone(), loss_best.clone()
            eta[halve] /= 2.0
            x_adv[halve], grad[halve] = x_best[halve], grad_best[halve]
            x_prev[halve] = x_best[halve]
            last_mark, raised = k + 1, torch.zeros(b, device=x.device)


def apgd_eot(
    loss_fn: DrawLoss,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    steps: int,
    eot: int,
    gen: np.random.Generator,
    restarts: int = 1,
    draw_chunk: int = 8,
    progress: Callable[[int], None] | None = None,
    trace: list[float] | None = None,
) -> torch.Tensor:
    """APGD (L-inf) ascending the EOT mean of ``loss_fn``; per image the best iterate over all restarts."""
    tgen = torch.Generator().manual_seed(int(gen.integers(2**31)))
    best = BestIterate(x)
    for _ in range(restarts):
        grad_fn = partial(eot_gradient, loss_fn, y=y, eot=eot, chunk=draw_chunk)
        _run_once(grad_fn, x, eps=eps, steps=steps, gen=tgen, best=best, progress=progress)
    if trace is not None:
        trace.extend(best.history)
    return best.x

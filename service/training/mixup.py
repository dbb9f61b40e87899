"""The training-time building blocks of SPEC section 8: augmentation, mixup, soft cross-entropy, PGD for IAT.

All tensors are float32 images (B, C, H, W) in [0, 1] (the networks normalise inside). Randomness comes from an
explicit CPU ``torch.Generator`` so a run is reproducible and resumable at epoch boundaries.
"""

from __future__ import annotations

import logging
from enum import StrEnum

import torch
import torch.nn.functional as F
from torch import nn

LOGGER = logging.getLogger(__name__)


class Augment(StrEnum):
    """Training augmentation (the pool and evaluation never use one)."""

    NONE = "none"
    SHIFT = "shift"  #: MNIST: random translation by up to ``pad`` pixels, zero fill
    FLIP_CROP = "flip-crop"  #: CIFAR: random horizontal flip, random crop with ``pad``-pixel zero padding


def random_crop(x: torch.Tensor, pad: int, gen: torch.Generator) -> torch.Tensor:
    """Zero-pad by ``pad`` and crop back to (H, W) at a per-image random offset in [0, 2*pad] (vectorised)."""
    if pad <= 0:
        return x
    b, _, h, w = x.shape
    xp = F.pad(x, (pad, pad, pad, pad))
    oy = torch.randint(0, 2 * pad + 1, (b,), generator=gen).to(x.device)
    ox = torch.randint(0, 2 * pad + 1, (b,), generator=gen).to(x.device)
    rows = (oy[:, None] + torch.arange(h, device=x.device)[None, :])[:, None, :, None]  # (B,1,H,1)
    cols = (ox[:, None] + torch.arange(w, device=x.device)[None, :])[:, None, None, :]  # (B,1,1,W)
    bidx = torch.arange(b, device=x.device)[:, None, None, None]
    cidx = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    return xp[bidx, cidx, rows, cols]


def augment(x: torch.Tensor, kind: Augment, pad: int, gen: torch.Generator) -> torch.Tensor:
    """Apply a training augmentation to a batch."""
    if kind is Augment.NONE:
        return x
    if kind is Augment.FLIP_CROP:
        flip = (torch.rand(x.shape[0], generator=gen) < 0.5).to(x.device)
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
    return random_crop(x, pad, gen)


def mixup(
    x: torch.Tensor, target: torch.Tensor, alpha: float, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup as the reference: two independent permutations a, b and a per-sample lam ~ Beta(alpha, alpha).

    Returns ``lam * x[a] + (1 - lam) * x[b]`` and the same blend of the soft targets (B, K).
    """
    b = x.shape[0]
    a_idx = torch.randperm(b, generator=gen).to(x.device)
    b_idx = torch.randperm(b, generator=gen).to(x.device)
    if alpha > 0:
        # Beta via two Gammas so the draw uses our generator (torch.distributions has no generator argument).
        g1 = torch._standard_gamma(torch.full((b,), float(alpha)), generator=gen)
        g2 = torch._standard_gamma(torch.full((b,), float(alpha)), generator=gen)
        lam = (g1 / (g1 + g2)).to(x.device)
    else:
        lam = torch.ones(b, device=x.device)
    lx = lam.view(b, 1, 1, 1)
    lt = lam.view(b, 1)
    return lx * x[a_idx] + (1 - lx) * x[b_idx], lt * target[a_idx] + (1 - lt) * target[b_idx]


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """mean over the batch of ``-sum_k target_k * log_softmax(logits)_k``."""
    return -(target * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


def pgd_linf(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    step: float,
    steps: int,
    gen: torch.Generator,
) -> torch.Tensor:
    """Untargeted L-inf PGD with one uniform random start, cross-entropy loss, pixels kept in [0, 1].

    The caller puts the model in eval mode (SPEC section 8: PGD for IAT runs in eval mode).

    Args:
        model: maps (B, C, H, W) in [0, 1] to logits.
        x: clean images; y: labels to push away from (IAT uses the model's current predictions).
        eps, step: radius and step size in [0, 1] pixel units; steps: iterations.
    """
    noise = (torch.rand(x.shape, generator=gen) * 2 - 1).to(x.device) * eps
    adv = (x + noise).clamp(0.0, 1.0).detach()
    for _ in range(steps):
        adv.requires_grad_(True)
        loss = F.cross_entropy(model(adv), y)
        (grad,) = torch.autograd.grad(loss, adv)
        with torch.no_grad():
            adv = adv + step * grad.sign()
            adv = torch.min(torch.max(adv, x - eps), x + eps).clamp(0.0, 1.0)
        adv = adv.detach()
    return adv

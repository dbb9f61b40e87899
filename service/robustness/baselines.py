"""The paper's input-transformation baselines (SPEC 9.2): random transforms at inference, softmax averaged.

Each baseline maps a batch (M, C, H, W) in [0, 1] to one random transform per image, vectorised (per-image
parameters are tensors, transforms are gathers or ``grid_sample``). ``predict_baseline`` averages the softmax over
``draws`` independent transforms per image, in one batched call per chunk of draws. Random parameters come from a
CPU generator (the same draws on any device) and are moved to the input's device.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

LOGGER = logging.getLogger(__name__)

Transform = Callable[[torch.Tensor, torch.Generator], torch.Tensor]

#: Gaussian noise std in [0, 1] units (0.05 in [-1, 1] units)
NOISE_STD = 0.025
#: rotation angle range in degrees
ROTATION_DEG = 20.0
#: crop sizes as a fraction of the image side (24..32 of 32; 21..28 of 28)
CROP_MIN_FRACTION = 0.75


def _crop_range(h: int) -> tuple[int, int]:
    return round(CROP_MIN_FRACTION * h), h


def gaussian_noise(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """x + N(0, 0.025^2), not clipped (as the reference)."""
    return x + NOISE_STD * torch.randn(x.shape, generator=gen).to(x.device)


def random_rotation(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Rotate each image by an angle uniform in [-20, 20] degrees (bilinear, zero fill)."""
    m = x.shape[0]
    theta = (torch.rand(m, generator=gen) * 2.0 - 1.0) * math.radians(ROTATION_DEG)
    cos, sin = torch.cos(theta), torch.sin(theta)
    zeros = torch.zeros(m)
    affine = torch.stack([torch.stack([cos, -sin, zeros], 1), torch.stack([sin, cos, zeros], 1)], 1).to(x.device)
    grid = F.affine_grid(affine, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def crop_pad(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Xie et al. as implemented: crop a random s x s patch (s uniform integer in [0.75 H, H]), zero-pad back at a
    random offset."""
    m, c, h, w = x.shape
    lo, hi = _crop_range(h)
    s = torch.randint(lo, hi + 1, (m,), generator=gen)
    src_r = (torch.rand(m, generator=gen) * (h - s + 1)).floor().long()
    src_c = (torch.rand(m, generator=gen) * (w - s + 1)).floor().long()
    dst_r = (torch.rand(m, generator=gen) * (h - s + 1)).floor().long()
    dst_c = (torch.rand(m, generator=gen) * (w - s + 1)).floor().long()
    ii = torch.arange(h).view(1, h, 1)
    jj = torch.arange(w).view(1, 1, w)
    rr = ii - dst_r.view(m, 1, 1)
    cc = jj - dst_c.view(m, 1, 1)
    inside = (rr >= 0) & (rr < s.view(m, 1, 1)) & (cc >= 0) & (cc < s.view(m, 1, 1))
    src = ((rr + src_r.view(m, 1, 1)).clamp(0, h - 1) * w + (cc + src_c.view(m, 1, 1)).clamp(0, w - 1)).view(m, 1, -1)
    out = x.reshape(m, c, h * w).gather(2, src.to(x.device).expand(m, c, h * w)).view(m, c, h, w)
    return out * inside.to(x.device).unsqueeze(1)


def crop_resize(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Guo et al. as implemented: crop a random s x s patch (s in [0.75 H, H]) and resize it bilinearly to H x W."""
    m, _, h, w = x.shape
    lo, hi = _crop_range(h)
    s = torch.randint(lo, hi + 1, (m,), generator=gen).float()
    top = (torch.rand(m, generator=gen) * (h - s + 1)).floor()
    left = (torch.rand(m, generator=gen) * (w - s + 1)).floor()
    # affine map from output [-1, 1] to the crop's span in input normalised coordinates (align_corners=False)
    scale_y, scale_x = s / h, s / w
    ty = (2 * top + s) / h - 1
    tx = (2 * left + s) / w - 1
    zeros = torch.zeros(m)
    affine = torch.stack([torch.stack([scale_x, zeros, tx], 1), torch.stack([zeros, scale_y, ty], 1)], 1).to(x.device)
    grid = F.affine_grid(affine, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


BASELINES: dict[str, Transform] = {
    "gaussian": gaussian_noise,
    "rotation": random_rotation,
    "crop_pad": crop_pad,
    "crop_resize": crop_resize,
}


@torch.no_grad()
def predict_baseline(
    logits_fn: Callable[[torch.Tensor], torch.Tensor],
    transform: Transform,
    x: torch.Tensor,
    draws: int,
    *,
    gen: torch.Generator,
    max_batch: int = 4096,
) -> torch.Tensor:
    """Mean over ``draws`` random transforms of softmax(f(T(x))), (B, K)."""
    b = x.shape[0]
    per_call = max(1, max_batch // b)
    total: torch.Tensor | None = None
    done = 0
    while done < draws:
        n = min(per_call, draws - done)
        xt = transform(x.repeat(n, 1, 1, 1), gen)
        probs = torch.softmax(logits_fn(xt), dim=1).view(n, b, -1).sum(dim=0)
        total = probs if total is None else total + probs
        done += n
    assert total is not None
    return total / draws

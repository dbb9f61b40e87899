"""An independently trained surrogate for the transfer attack: another architecture, another seed, same data.

Transfer from the defended model's own base network is not a transfer attack (the attacker would need the
weights); the surrogate is a small LeNet-style network (5x5 convolutions with max pooling, no batch norm, unlike
the bundle's ``mnist_cnn``/ResNets) trained from scratch with plain cross-entropy on the bundle's recorded train
split, with its own seed. Its weights are cached as safetensors next to the attack cache, keyed by the training data
(dataset and splits hashes: versions of a model that share them share the surrogate), seed and epochs, so a resumed
evaluation reuses them.

Shapes: images float32 (B, C, H, W) in [0, 1] -> logits (B, K).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

if TYPE_CHECKING:
    from service.store import Bundle

LOGGER = logging.getLogger(__name__)

#: seed of the surrogate's initialisation and batch order (the bundles' recipes use other seeds)
SURROGATE_SEED = 1234


def lenet(in_channels: int, n_classes: int) -> nn.Module:
    """LeNet-style surrogate: conv5-pool-conv5-pool-fc; works for 28x28 and 32x32 inputs."""
    return nn.Sequential(
        nn.Conv2d(in_channels, 32, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.AdaptiveAvgPool2d(7),
        nn.Flatten(),
        nn.Linear(64 * 7 * 7, 256),
        nn.ReLU(),
        nn.Linear(256, n_classes),
    )


def training_data_key(bundle: Bundle) -> str:
    """A short hash of what the surrogate learns from: the dataset's content and the bundle's splits file."""
    import hashlib

    blob = f"{bundle.manifest.dataset.sha256}:{bundle.manifest.files.get('splits.npz', '')}"
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def train_surrogate(
    bundle: Bundle,
    *,
    epochs: int,
    cache_dir: Path | None = None,
    data_root: Path | None = None,
    seed: int = SURROGATE_SEED,
    device: torch.device | str = "cpu",
) -> nn.Module:
    """Train (or load from ``cache_dir``) the surrogate on ``bundle``'s train split; returns it in eval mode."""
    from safetensors.torch import load_file, save_file

    from service.robustness.data import load_split

    c, _, _ = bundle.manifest.input.shape
    k = bundle.manifest.n_classes
    torch.manual_seed(seed)
    model = lenet(c, k)
    path = None
    if cache_dir is not None:
        path = cache_dir / f"surrogate-{training_data_key(bundle)}-s{seed}-e{epochs}.safetensors"
        if path.exists():
            model.load_state_dict(load_file(str(path)))
            LOGGER.info("surrogate loaded from %s", path)
            return _frozen(model, device)
    x_np, y_np, _ = load_split(bundle, "train", None, data_root)
    x, y = torch.from_numpy(x_np), torch.from_numpy(y_np)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    rng = np.random.default_rng(seed)
    model.train()
    for epoch in range(epochs):
        order = torch.from_numpy(rng.permutation(x.shape[0]))
        for i in range(0, x.shape[0], 128):
            idx = order[i : i + 128]
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
        LOGGER.info("surrogate epoch %d/%d done", epoch + 1, epochs)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({n: t.contiguous() for n, t in model.state_dict().items()}, str(path))
    return _frozen(model, device)


def _frozen(model: nn.Module, device: torch.device | str) -> nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model.to(device)

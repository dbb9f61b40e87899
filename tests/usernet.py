"""A user's own network for ``mixinfer bundle --arch usernet:make`` (tests put ``tests/`` on the path)."""

from __future__ import annotations

from torch import nn


def make(n_classes: int) -> nn.Module:
    """A tiny CNN for 1-channel 28x28 digits."""
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 14 * 14, n_classes)
    )


def not_a_module(n_classes: int) -> int:
    return n_classes

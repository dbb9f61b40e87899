"""The thin contract between the MI engine and whatever runs the network."""

from __future__ import annotations

from typing import Protocol, TypeAlias, runtime_checkable

import numpy as np
from numpy.typing import NDArray

#: float32 (B, C, H, W), pixels in [0, 1]
Images: TypeAlias = NDArray[np.float32]
#: float32 (B, n_classes)
Logits: TypeAlias = NDArray[np.float32]
#: float32 (B, n_classes), rows sum to 1
Probs: TypeAlias = NDArray[np.float32]
#: int64 (B, N): flat indices into the pool's ``images``
PartnerIndices: TypeAlias = NDArray[np.int64]


@runtime_checkable
class Classifier(Protocol):
    """A callable from images (B,C,H,W) float32 in [0,1] to logits (B, n_classes) float32."""

    def __call__(self, images: Images) -> Logits: ...


@runtime_checkable
class MixingBackend(Protocol):
    """What the MI engine needs from a backend: plain probabilities and averaged mix probabilities.

    The backend owns the pool (uint8 (P,C,H,W)); on a GPU it keeps it on the device so that per call only the
    input images and the partner indices cross the bus.
    """

    n_classes: int
    input_shape: tuple[int, int, int]
    provider: str  #: execution provider actually in use, e.g. 'CUDAExecutionProvider'

    def probs(self, images: Images) -> Probs:
        """softmax(f(images)), float32 (B, K)."""
        ...

    def mean_mix_probs(self, images: Images, partners: PartnerIndices, lam: float) -> Probs:
        """mean_j softmax(f(lam * images[b] + (1 - lam) * pool[partners[b, j]])), float32 (B, K).

        Chunked internally so that no single backend call exceeds the configured number of mixes.
        """
        ...

    def warmup(self, batch_sizes: tuple[int, ...], mixes_per_image: tuple[int, ...] = (1,)) -> None:
        """Run every code path once at each batch size (mix path: with each N) so the first request pays no
        initialisation."""
        ...

"""Scoring with the served system: the bundle's ONNX model through the real :class:`MIEngine`, fresh seeds.

Torch only supplies gradients; every reported MI number comes from here. An input counts as broken if any of the
server seeds gets it wrong (SPEC 9.3).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray

from service.mi.engine import MIEngine
from service.mi.params import Mode

if TYPE_CHECKING:
    from service.backends.onnx import OrtBackend
    from service.store import Bundle

LOGGER = logging.getLogger(__name__)

#: the defences the served engine offers, in report order
SERVED_MODES: tuple[Mode, ...] = (Mode.OFF, Mode.PL, Mode.OL, Mode.COMBINED)


@dataclass(frozen=True)
class SeedScores:
    """Per-seed, per-image outputs of one mode of the served engine on one set of inputs (S seeds, B images).

    Attributes:
        label: int64 (S, B).
        probs: float32 (S, B, K) returned probabilities.
        gap: float32 (S, B), NaN where no gap is computed.
        flagged: bool (S, B).
    """

    label: NDArray[np.int64]
    probs: NDArray[np.float32]
    gap: NDArray[np.float32]
    flagged: NDArray[np.bool_]


class ServedScorer:
    """The served engine over a bundle, scoring inputs under several fresh server seeds.

    Args:
        backend: the bundle's ONNX backend (CPU provider here).
        bundle: the verified bundle (pool labels and MI parameters come from its manifest).
        seeds: server seeds; each scoring call uses every one of them, each with a fresh generator.
        max_batch: images per engine call.
    """

    def __init__(self, backend: OrtBackend, bundle: Bundle, seeds: list[int], max_batch: int = 256) -> None:
        self.backend = backend
        self.pool_labels, self.params = bundle.pool_labels, bundle.manifest.mi
        self.engine = MIEngine(backend, self.pool_labels, self.params)
        self.seeds = list(seeds)
        self.max_batch = max_batch

    @classmethod
    def from_bundle(cls, bundle: Bundle, seeds: list[int]) -> ServedScorer:
        from service.store import open_backend

        return cls(open_backend(bundle, providers=["CPUExecutionProvider"]), bundle, seeds)

    def score(self, images: NDArray[np.float32], mode: Mode) -> SeedScores:
        """Run ``mode`` on ``images`` once per seed (float32 (B, C, H, W) in [0, 1], on the 8-bit grid)."""
        labels, probs, gaps, flags = [], [], [], []
        for seed in self.seeds:
            rng = np.random.default_rng(seed)
            parts = [
                self.engine(images[i : i + self.max_batch], mode, rng=rng)
                for i in range(0, images.shape[0], self.max_batch)
            ]
            labels.append(np.concatenate([r.label for r in parts]))
            probs.append(np.concatenate([r.probs for r in parts]))
            gaps.append(np.concatenate([r.gap for r in parts]))
            flags.append(np.concatenate([r.flagged for r in parts]))
        return SeedScores(np.stack(labels), np.stack(probs), np.stack(gaps), np.stack(flags))

    def seeded_engine(self, seed: int) -> MIEngine:
        """Another engine over the same model and parameters whose fresh draws come from ``seed`` (reproducible
        black-box attacks: every query still gets new draws, as from a server)."""
        return MIEngine(self.backend, self.pool_labels, self.params, seed=seed)

    def fresh_probs(self, images: NDArray[np.float32], mode: Mode = Mode.COMBINED) -> NDArray[np.float32]:
        """One query as a client sees it: fresh server randomness (the engine's own generator), probabilities."""
        return self.engine(images, mode).probs

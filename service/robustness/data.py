"""The evaluation images of a bundle: its recorded split of the dataset named (and hashed) in its manifest."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray

from service.errors import BundleError

if TYPE_CHECKING:
    from service.store import Bundle

LOGGER = logging.getLogger(__name__)


#: seed of the subset an evaluation takes from a split (fixed: every budget and bundle sees the same images)
SUBSET_SEED = 0


def load_split(
    bundle: Bundle, split: str = "test", n: int | None = None, data_root: Path | None = None
) -> tuple[NDArray[np.float32], NDArray[np.int64], NDArray[np.int64]]:
    """Images and labels of one recorded split; with ``n``, a fixed seeded random subset of n images.

    Split indices are stored sorted and datasets such as mnist5k are sorted by class, so "the first n" would be
    one or two classes only: the subset is the first n of a permutation seeded with :data:`SUBSET_SEED`.

    Args:
        bundle: a verified bundle.
        split: ``test`` (evaluation) or ``calibration`` (the sweep).
        n: keep the first n images.
        data_root: dataset directory (CIFAR, image folders); unused for ``mnist5k``.

    Returns:
        (float32 (n, C, H, W) in [0, 1] on the 8-bit grid, int64 labels (n,), int64 dataset indices (n,)).
        Several classes appear even for small n (a test checks the subset is not class-sorted).

    Raises:
        BundleError: the dataset's hash differs from the manifest's, or the split is empty.
    """
    from service.training.datasets import load_manifest_dataset

    info = bundle.manifest.dataset
    ds = load_manifest_dataset(bundle.manifest, data_root)
    if ds.sha256 != info.sha256:
        raise BundleError(
            f"dataset {info.name!r} at {data_root}: sha256 {ds.sha256} differs from the manifest's {info.sha256}"
        )
    idx = bundle.splits[split]
    if n is not None and n < idx.size:
        idx = idx[np.random.default_rng(SUBSET_SEED).permutation(idx.size)[:n]]
    if idx.size == 0:
        raise BundleError(f"split {split!r} of {bundle.path} is empty, expected >= 1 image")
    images = ds.images[idx].astype(np.float32) / np.float32(255.0)
    LOGGER.info("%s split of %s: %d images", split, info.name, idx.size)
    return images, ds.labels[idx].astype(np.int64), idx.astype(np.int64)

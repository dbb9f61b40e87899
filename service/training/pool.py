"""The MI reference pool: the pool split's clean images (no augmentation), stored as ``pool.npz``.

Format (service/manifest.py): ``images`` uint8 (P, C, H, W) and ``labels`` int64 (P,), sorted by label, in the
order of ``splits.npz["pool"]``. Every class needs at least one image (SPEC section 3).
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from service.training.datasets import Dataset
from service.training.splits import Splits

LOGGER = logging.getLogger(__name__)


def pool_arrays(dataset: Dataset, splits: Splits) -> tuple[NDArray[np.uint8], NDArray[np.int64]]:
    """Images and labels of the pool split, checked to be label-sorted with every class present."""
    idx = splits.pool
    images = np.ascontiguousarray(dataset.images[idx])
    labels = dataset.labels[idx].astype(np.int64)
    if np.any(np.diff(labels) < 0):
        raise ValueError("pool indices must be sorted by label (splits.make_splits does this)")
    counts = np.bincount(labels, minlength=dataset.n_classes)
    if np.any(counts == 0):
        raise ValueError(f"pool class {int(np.flatnonzero(counts == 0)[0])} has 0 images, every class needs >= 1")
    return images, labels


def pool_sha256(images: NDArray[np.uint8], labels: NDArray[np.int64]) -> str:
    """Content hash of a pool (shape, pixels, labels); independent of the npz container's timestamps."""
    h = hashlib.sha256(repr(tuple(images.shape)).encode())
    h.update(np.ascontiguousarray(images).tobytes())
    h.update(np.ascontiguousarray(labels, dtype="<i8").tobytes())
    return h.hexdigest()


def write_pool(path: Path, dataset: Dataset, splits: Splits) -> str:
    """Write ``pool.npz`` (compressed) and return the pool's content hash."""
    images, labels = pool_arrays(dataset, splits)
    np.savez_compressed(path, images=images, labels=labels)
    digest = pool_sha256(images, labels)
    LOGGER.info("pool: %d images, %s per class, content sha256 %s", labels.size, np.bincount(labels).tolist(), digest)
    return digest

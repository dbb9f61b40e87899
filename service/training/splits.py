"""Deterministic, seeded, stratified train / pool / calibration / test splits (SPEC section 3).

Disjointness rule: test is disjoint from train, pool and calibration; calibration is disjoint from train and pool;
the pool is a subset of train (first K per class of the training indices after one seeded shuffle).
``pool`` is stored in the order of ``pool.npz`` (sorted by label, then by index), so ``pool.npz["images"][i]`` is
``dataset.images[splits.pool[i]]``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from service.manifest import SPLIT_NAMES

LOGGER = logging.getLogger(__name__)

Index = NDArray[np.int64]


class SplitError(ValueError):
    """Split sizes that cannot be met, or splits that break the disjointness rule."""


@dataclass(frozen=True)
class Splits:
    """Index arrays into the dataset's canonical order (int64)."""

    train: Index
    pool: Index
    calibration: Index
    test: Index

    def as_dict(self) -> dict[str, Index]:
        return {name: getattr(self, name) for name in SPLIT_NAMES}

    def sizes(self) -> dict[str, int]:
        return {name: int(arr.size) for name, arr in self.as_dict().items()}

    def check(self, n_images: int) -> None:
        """Raise :class:`SplitError` unless the indices are in range, unique, and obey the disjointness rule."""
        for name, arr in self.as_dict().items():
            if arr.dtype != np.int64 or arr.ndim != 1:
                raise SplitError(f"split {name}: expected a 1-D int64 array, got {arr.dtype} {arr.shape}")
            if arr.size and (arr.min() < 0 or arr.max() >= n_images):
                raise SplitError(f"split {name}: indices must lie in [0, {n_images - 1}]")
            if np.unique(arr).size != arr.size:
                raise SplitError(f"split {name}: has repeated indices")
        pairs = [("test", "train"), ("test", "pool"), ("test", "calibration"), ("calibration", "train")]
        pairs.append(("calibration", "pool"))
        for a, b in pairs:
            both = np.intersect1d(getattr(self, a), getattr(self, b))
            if both.size:
                raise SplitError(f"splits {a} and {b} share {both.size} images (e.g. index {int(both[0])})")

    def save(self, path: Path) -> None:
        np.savez(path, train=self.train, pool=self.pool, calibration=self.calibration, test=self.test)

    @classmethod
    def load(cls, path: Path) -> Splits:
        with np.load(path, allow_pickle=False) as z:
            return cls(**{name: np.asarray(z[name], dtype=np.int64) for name in SPLIT_NAMES})


def _allocate(total: int, counts: NDArray[np.int64]) -> NDArray[np.int64]:
    """Split ``total`` over classes in proportion to ``counts`` (largest remainder; ties to the lowest class)."""
    if total == 0:
        return np.zeros_like(counts)
    quota = total * counts / counts.sum()
    alloc = np.floor(quota).astype(np.int64)
    rest = total - int(alloc.sum())
    order = np.lexsort((np.arange(counts.size), -(quota - alloc)))
    alloc[order[:rest]] += 1
    return alloc


def make_splits(
    labels: NDArray[np.int64],
    n_classes: int,
    *,
    seed: int,
    test_size: int,
    calibration_size: int,
    pool_per_class: int,
    fixed_test: Index | None = None,
) -> Splits:
    """Stratified, seeded splits.

    Each class's indices (outside ``fixed_test``) are shuffled once with ``numpy.random.default_rng(seed)``,
    classes in order; the first share goes to test (unless ``fixed_test`` is given), the next to calibration, the
    rest to train, and the first ``pool_per_class`` training indices of the class (in shuffled order) to the pool.

    Args:
        labels: int64 (N,) labels in canonical order.
        n_classes: number of classes; every class needs at least one pool image.
        seed: the split seed (recorded in the manifest's recipe).
        test_size: test images in total, shared over classes in proportion (ignored with ``fixed_test``).
        calibration_size: calibration images in total, shared likewise.
        pool_per_class: K; a class with fewer training images gives all it has (logged).
        fixed_test: an official test split to use as is.

    Raises:
        SplitError: sizes that leave a class without training images.
    """
    labels = np.asarray(labels, dtype=np.int64)
    rng = np.random.default_rng(seed)
    n = labels.size
    outside = np.ones(n, dtype=bool)
    if fixed_test is not None:
        outside[fixed_test] = False
        test_size = 0
    counts = np.bincount(labels[outside], minlength=n_classes).astype(np.int64)
    if np.any(counts == 0):
        raise SplitError(f"class {int(np.flatnonzero(counts == 0)[0])} has no images outside the test split")
    n_test = _allocate(test_size, counts)
    n_cal = _allocate(calibration_size, counts)
    test: list[Index] = [np.asarray(fixed_test, dtype=np.int64)] if fixed_test is not None else []
    cal: list[Index] = []
    train: list[Index] = []
    pool: list[Index] = []
    for k in range(n_classes):
        idx = rng.permutation(np.flatnonzero((labels == k) & outside))
        t, c = int(n_test[k]), int(n_cal[k])
        if t + c >= idx.size:
            raise SplitError(f"class {k} has {idx.size} images, too few for {t} test + {c} calibration + >= 1 train")
        test.append(idx[:t])
        cal.append(idx[t : t + c])
        tr = idx[t + c :]
        train.append(tr)
        if tr.size < pool_per_class:
            LOGGER.info("class %d: pool takes all %d training images (asked for %d)", k, tr.size, pool_per_class)
        pool.append(np.sort(tr[:pool_per_class]))
    splits = Splits(
        train=np.sort(np.concatenate(train)).astype(np.int64),
        pool=np.concatenate(pool).astype(np.int64),
        calibration=np.sort(np.concatenate(cal)).astype(np.int64),
        test=np.sort(np.concatenate(test)).astype(np.int64),
    )
    splits.check(n)
    return splits

"""Per-class view of the reference pool and the vectorised partner draws of MI-PL and MI-OL."""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from service.errors import BundleError


class PoolIndex:
    """Class offsets of a label-sorted pool, and the partner samplers.

    Args:
        labels: int64 (P,), sorted ascending; every class 0..n_classes-1 needs at least one image.
        n_classes: number of classes C (>= 2).

    Raises:
        BundleError: labels unsorted, out of range, or a class without images.
    """

    def __init__(self, labels: NDArray[np.int64], n_classes: int) -> None:
        labels = np.asarray(labels)
        if labels.ndim != 1 or labels.size == 0:
            raise BundleError(f"pool labels must be a non-empty 1-D array, got shape {labels.shape}")
        if n_classes < 2:
            raise BundleError(f"MI needs >= 2 classes, got {n_classes}")
        if labels.min() < 0 or labels.max() >= n_classes:
            raise BundleError(
                f"pool labels must lie in [0, {n_classes - 1}], got [{int(labels.min())}, {int(labels.max())}]"
            )
        if np.any(np.diff(labels) < 0):
            raise BundleError("pool labels must be sorted by class, got an unsorted array")
        counts = np.bincount(labels, minlength=n_classes).astype(np.int64)
        empty = np.flatnonzero(counts == 0)
        if empty.size:
            raise BundleError(
                f"pool class {int(empty[0])} has 0 images, every class needs >= 1 (empty classes: {empty.tolist()})"
            )
        self.n_classes = n_classes
        self.counts: NDArray[np.int64] = counts
        self.starts: NDArray[np.int64] = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        self.size = int(labels.size)

    def _draw_in_classes(self, classes: NDArray[np.int64], gen: np.random.Generator) -> NDArray[np.int64]:
        """One uniform flat index inside each given class (any shape), with replacement."""
        return self.starts[classes] + gen.integers(0, self.counts[classes])

    def sample_same(self, y_hat: NDArray[np.int64], n: int, gen: np.random.Generator) -> NDArray[np.int64]:
        """MI-PL partners: (M, n) flat indices, each uniform in the pool of the image's predicted class."""
        classes = np.repeat(np.asarray(y_hat, dtype=np.int64)[:, None], n, axis=1)
        return self._draw_in_classes(classes, gen)

    def sample_other(self, y_hat: NDArray[np.int64], n: int, gen: np.random.Generator) -> NDArray[np.int64]:
        """MI-OL partners: (M, n); class uniform over the C-1 classes != y_hat, then an image uniform in it.

        Uses the closed form y_s = (y_hat + 1 + u) mod C with u uniform in {0..C-2}, which has the same
        distribution as the reference's rejection loop.
        """
        y = np.asarray(y_hat, dtype=np.int64)[:, None]
        u = gen.integers(0, self.n_classes - 1, size=(y.shape[0], n))
        classes = (y + 1 + u) % self.n_classes
        return self._draw_in_classes(classes, gen)

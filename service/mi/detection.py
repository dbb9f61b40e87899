"""The detection gap and flag rule of MI-Combined (SPEC section 5), as pure numpy functions."""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray


def detection_gap(clean_probs: NDArray[np.float32], pl_probs: NDArray[np.float32]) -> NDArray[np.float32]:
    """g = max_k p(x)_k - max_k q_PL_k, per image.

    The second term is the largest entry of the averaged PL vector, whichever class it belongs to (as the
    reference computes it), not the entry at the plain prediction.

    Args:
        clean_probs: float32 (B, K), plain softmax.
        pl_probs: float32 (B, K), MI-PL averaged softmax.

    Returns:
        float32 (B,).
    """
    return (clean_probs.max(axis=1) - pl_probs.max(axis=1)).astype(np.float32)


def is_flagged(gap: NDArray[np.float32], threshold: float) -> NDArray[np.bool_]:
    """Flag iff gap >= threshold (equality counts as flagged)."""
    return np.asarray(gap >= np.float32(threshold))

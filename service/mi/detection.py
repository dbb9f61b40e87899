"""The detection gap and flag rule of MI-Combined (SPEC section 5), as pure numpy functions."""

from __future__ import annotations

from typing import Any, TypeVar

import numpy as np
from numpy.typing import NDArray

#: a float32 numpy array (serving) or a torch tensor (the evaluation twin): both compare the same way
GapArray = TypeVar("GapArray", NDArray[np.float32], Any)


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


def is_flagged(gap: GapArray, threshold: float) -> Any:
    """Flag iff gap >= threshold (equality counts as flagged), compared in float32.

    The one flag rule of serving (engine, the ``pl`` mode's flags) and evaluation (the torch twin); the reference
    implementation keeps its own copy on purpose. ``gap``: a float32 numpy array, or a torch tensor (detached);
    returns a bool array / tensor of the same kind.
    """
    return gap >= np.float32(threshold)

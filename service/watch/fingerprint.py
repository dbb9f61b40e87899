"""Probabilistic content fingerprints of images (after Blacklight, Li et al., USENIX Security 2022).

An image's uint8 pixels are quantised (``pixel // quant_step``), read as one flat sequence, and every window of
``window`` consecutive quantised pixels is hashed; the ``top`` largest distinct hashes are the fingerprint. Two
queries that share many of those hashes share many windows of content, which is what the near-copies of an
iterative black-box attack do (a Square step changes one patch, a gradient-estimation probe a few quantisation
levels), while two different photographs share few. The hash of every window comes from one prefix sum (a
polynomial rolling hash modulo 2**64), so a fingerprint costs a few vectorised passes over the pixels.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cache

import numpy as np
from numpy.typing import NDArray

#: one fingerprint: at most ``top`` distinct uint64 hashes, ascending
Fingerprint = NDArray[np.uint64]
#: uint8 pixels of one image, any shape (flattened in C order)
Pixels8 = NDArray[np.uint8]

# An odd 64-bit multiplier: odd, so it has an inverse modulo 2**64 (the rolling hash divides by its powers).
_BASE = np.uint64(0x9E3779B97F4A7C15)
_BASE_INVERSE = np.uint64(pow(int(_BASE), -1, 1 << 64))


@dataclass(frozen=True)
class FingerprintParams:
    """How fingerprints are made and compared; the defaults were measured on MNIST (see docs/query-watch.md).

    Attributes:
        quant_step: pixel values per quantisation level (50: levels 0..5 of 0..255).
        window: quantised pixels per hashed window.
        top: distinct window hashes kept per image (the largest ones; 20 detected as many near-copies as 50 on
            MNIST at 2.5x less lookup work and memory).
        match: shared hashes that make two queries near-copies (of ``top``).
    """

    quant_step: int = 50
    window: int = 20
    top: int = 20
    match: int = 15

    def __post_init__(self) -> None:
        if not 1 <= self.quant_step <= 256:
            raise ValueError(f"quant_step must be in [1, 256], got {self.quant_step}")
        if self.window < 1 or self.top < 1:
            raise ValueError(f"window and top must be >= 1, got {self.window} and {self.top}")
        if not 1 <= self.match <= self.top:
            raise ValueError(f"match must be in [1, top={self.top}], got {self.match}")


@cache
def _powers(length: int) -> tuple[NDArray[np.uint64], NDArray[np.uint64]]:
    """``BASE**t`` and ``BASE**-t`` modulo 2**64 for t < length (wrapping uint64 products are the modulus)."""
    with np.errstate(over="ignore"):
        up = np.cumprod(np.full(length, _BASE, dtype=np.uint64), dtype=np.uint64)
        down = np.cumprod(np.full(length, _BASE_INVERSE, dtype=np.uint64), dtype=np.uint64)
    up = np.concatenate(([np.uint64(1)], up[:-1]))
    down = np.concatenate(([np.uint64(1)], down[:-1]))
    up.flags.writeable = False
    down.flags.writeable = False
    return up, down


def _mix(x: NDArray[np.uint64]) -> NDArray[np.uint64]:
    """One xorshift-multiply round (half of splitmix64's finaliser): folds the well-mixed high bits of the
    polynomial hash into the low ones, so that 'the largest hashes' is a pick that no window pattern biases."""
    with np.errstate(over="ignore"):
        x = x ^ (x >> np.uint64(29))
        x *= np.uint64(0xBF58476D1CE4E5B9)
        return x


def window_hashes(pixels: Pixels8, params: FingerprintParams) -> NDArray[np.uint64]:
    """The mixed hash of every window (length ``pixels.size - window + 1``; one window if the image is shorter)."""
    levels = (pixels.reshape(-1) // np.uint8(params.quant_step)).astype(np.uint64) + np.uint64(1)
    n = levels.size
    w = min(params.window, n)
    up, down = _powers(n)
    with np.errstate(over="ignore"):
        prefix = np.empty(n + 1, dtype=np.uint64)
        prefix[0] = 0
        np.cumsum(levels * up, dtype=np.uint64, out=prefix[1:])
        # sum_k levels[i + k] * BASE**k == (prefix[i + w] - prefix[i]) * BASE**-i  (mod 2**64)
        raw = (prefix[w:] - prefix[:-w]) * down[: n - w + 1]
    return _mix(raw)


def fingerprint(pixels: Pixels8, params: FingerprintParams) -> Fingerprint:
    """The ``top`` largest distinct window hashes of one image, ascending."""
    ordered = np.sort(window_hashes(pixels, params))
    distinct = ordered[np.concatenate(([True], ordered[1:] != ordered[:-1]))]  # np.unique, 3x cheaper here
    return distinct[-params.top :]


def digest(pixels: Pixels8) -> bytes:
    """An exact digest of the pixels and their shape: equal digests are exact resends of one image."""
    h = hashlib.blake2b(digest_size=16)
    h.update(repr(pixels.shape).encode())
    h.update(np.ascontiguousarray(pixels).data)
    return h.digest()


def to_pixels(image: NDArray[np.floating]) -> Pixels8:
    """An image in [0, 1] (what the engine sees) as the uint8 pixels it came from, or their nearest quantisation."""
    return np.rint(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)

"""A deliberately plain Mixup Inference loop in the style of P2333/Mixup-Inference (tests and benchmark only).

One image at a time, one classifier call per blend (batch size 1), softmax vectors summed in a Python loop and
divided by N, partner classes for MI-OL drawn with the reference's rejection loop. It shares no code with
:mod:`service.mi.engine` beyond the parameter model, so tests can pin the batched engine against it, and the
benchmark can measure what batching buys. Never use it to serve.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from service.mi.params import Branch, MIParams, Mode

LOGGER = logging.getLogger(__name__)

#: images float32 (1, C, H, W) in [0, 1] -> logits float32 (1, K)
LogitsFn = Callable[[NDArray[np.float32]], NDArray[np.float32]]


@dataclass(frozen=True)
class ReferenceResult:
    """Per-image results of :func:`reference_mi`, with the same meaning as :class:`service.mi.engine.MIResult`.

    ``pl_partners`` / ``ol_partners`` are (B, N) flat pool indices, -1 where the branch did not run.
    """

    label: NDArray[np.int64]
    probs: NDArray[np.float32]
    clean_probs: NDArray[np.float32]
    gap: NDArray[np.float32]
    flagged: NDArray[np.bool_]
    branch: tuple[Branch, ...]
    n_forwards: NDArray[np.int64]
    pl_partners: NDArray[np.int64]
    ol_partners: NDArray[np.int64]


def _softmax_row(logits: NDArray[np.float32]) -> NDArray[np.float32]:
    z = logits.astype(np.float32) - np.float32(logits.max())
    e = np.exp(z)
    return (e / e.sum()).astype(np.float32)


def reference_mi(
    classify: LogitsFn,
    pool_images: NDArray[np.uint8],
    pool_labels: NDArray[np.int64],
    params: MIParams,
    images: NDArray[np.float32],
    *,
    mode: Mode = Mode.COMBINED,
    pl_partners: NDArray[np.int64] | None = None,
    ol_partners: NDArray[np.int64] | None = None,
    rng: np.random.Generator | None = None,
    both_branches: bool = False,
) -> ReferenceResult:
    """Mixup Inference one image and one blend at a time.

    Args:
        classify: the network at batch size 1: (1, C, H, W) float32 in [0, 1] -> (1, K) logits.
        pool_images: uint8 (P, C, H, W).
        pool_labels: int64 (P,).
        params: MI parameters (Combined uses ``ol_combined``, mode ``ol`` uses ``ol_standalone``).
        images: float32 (B, C, H, W) in [0, 1].
        mode: combined, pl, ol or off.
        pl_partners: (B, N_PL) flat indices to use instead of drawing (compare with the engine).
        ol_partners: (B, N_OL) flat indices to use instead of drawing.
        rng: generator for draws when partners are not given.
        both_branches: compute MI-OL for every image in mode combined, as the reference code does (benchmark);
            the returned probabilities are the same, only the cost differs.

    Returns:
        A :class:`ReferenceResult`.
    """
    gen = rng if rng is not None else np.random.default_rng()
    n_classes_pool = int(pool_labels.max()) + 1
    by_class = [np.flatnonzero(pool_labels == k) for k in range(n_classes_pool)]
    ol_spec = params.ol_standalone if mode is Mode.OL else params.ol_combined
    b = images.shape[0]
    labels, probs_out, clean_out, gaps, flags, branches, forwards = [], [], [], [], [], [], []
    pl_used = np.full((b, params.n_pl), -1, dtype=np.int64)
    ol_used = np.full((b, ol_spec.n), -1, dtype=np.int64)

    for i in range(b):
        x = images[i : i + 1].astype(np.float32)
        clean = _softmax_row(classify(x)[0])
        n_classes = clean.shape[0]
        y_hat = int(np.argmax(clean))
        c = clean.max()
        n_fwd = 1
        out = clean
        gap = np.float32(np.nan)
        flagged = False
        branch = Branch.OFF

        if mode in (Mode.PL, Mode.COMBINED):
            total = np.zeros(n_classes, dtype=np.float32)
            for j in range(params.n_pl):
                if pl_partners is not None:
                    idx = int(pl_partners[i, j])
                else:
                    idx = int(by_class[y_hat][gen.integers(0, by_class[y_hat].size)])
                pl_used[i, j] = idx
                sample = pool_images[idx].astype(np.float32) / np.float32(255.0)
                mixed = x * np.float32(params.lam_pl) + (np.float32(1.0) - np.float32(params.lam_pl)) * sample
                total = total + _softmax_row(classify(mixed.astype(np.float32))[0])
                n_fwd += 1
            q_pl = total / np.float32(params.n_pl)
            gap = np.float32(c - q_pl.max())
            out = q_pl
            branch = Branch.PL
            if mode is Mode.COMBINED:
                flagged = bool(gap >= np.float32(params.threshold))

        run_ol = mode is Mode.OL or (mode is Mode.COMBINED and (flagged or both_branches))
        if run_ol:
            total = np.zeros(n_classes, dtype=np.float32)
            for j in range(ol_spec.n):
                if ol_partners is not None:
                    idx = int(ol_partners[i, j])
                else:
                    y_s = y_hat
                    while y_s == y_hat:  # the reference's rejection loop
                        y_s = int(gen.integers(0, n_classes))
                    idx = int(by_class[y_s][gen.integers(0, by_class[y_s].size)])
                sample = pool_images[idx].astype(np.float32) / np.float32(255.0)
                mixed = x * np.float32(ol_spec.lam) + (np.float32(1.0) - np.float32(ol_spec.lam)) * sample
                total = total + _softmax_row(classify(mixed.astype(np.float32))[0])
                n_fwd += 1
                if mode is Mode.OL or flagged:
                    ol_used[i, j] = idx
            if mode is Mode.OL or flagged:
                out = total / np.float32(ol_spec.n)
                branch = Branch.OL

        labels.append(int(np.argmax(out)))
        probs_out.append(out)
        clean_out.append(clean)
        gaps.append(gap)
        flags.append(flagged)
        branches.append(branch)
        forwards.append(n_fwd)

    return ReferenceResult(
        label=np.array(labels, dtype=np.int64),
        probs=np.stack(probs_out).astype(np.float32),
        clean_probs=np.stack(clean_out).astype(np.float32),
        gap=np.array(gaps, dtype=np.float32),
        flagged=np.array(flags, dtype=bool),
        branch=tuple(branches),
        n_forwards=np.array(forwards, dtype=np.int64),
        pl_partners=pl_used,
        ol_partners=ol_used,
    )

"""Square attack (score-based black box) on the served engine's returned probabilities, to catch gradient masking.

Paper: Andriushchenko, Croce, Flammarion, Hein, "Square Attack: a query-efficient black-box adversarial attack via
random search", ECCV 2020 (L-inf version). Threat model: L-inf eps, black box with scores: each query is one call
of the served MI engine (fresh server randomness per query, exactly what a client sees), margin loss
p_y - max_{k != y} p_k on the returned probabilities (or on what a ``label`` response shows:
:mod:`service.robustness.blackbox`). Under MI's randomness one query can be lucky, so each candidate is judged by
the mean of ``votes`` fresh queries, and every image spends its whole query budget (no early stop once it is
misclassified: a lower margin survives more server draws). Defaults: ``p_init`` 0.8 (as AutoAttack; it beat 0.1
and 0.3 at 150 queries on MNIST), the paper's halving schedule, vertical-stripe initialisation, 1 vote. Vectorised
over images: every round is ``votes`` engine calls for all images; the square windows are broadcast masks.

Shapes: x float32 (B, C, H, W) in [0, 1]; y int64 (B,); returns float32 (B, C, H, W).

Example:
    >>> x_adv = square_linf(lambda imgs: engine(imgs).probs, x, y, eps=0.3, queries=1000, gen=rng, votes=4)
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from numpy.typing import NDArray

ScoreFn = Callable[[NDArray[np.float32]], NDArray[np.float32]]


def margin(probs: NDArray[np.float32], y: NDArray[np.int64]) -> NDArray[np.float32]:
    """p_y - max_{k != y} p_k per image (negative = misclassified)."""
    rows = np.arange(y.shape[0])
    true = probs[rows, y]
    other = probs.copy()
    other[rows, y] = -np.inf
    return (true - other.max(axis=1)).astype(np.float32)


def p_schedule(p_init: float, it: int, n_iters: int) -> float:
    """The paper's piecewise-constant fraction of pixels changed per query, rescaled to ``n_iters``."""
    it = int(it / n_iters * 10000)
    for bound, div in ((10, 1), (50, 2), (200, 4), (500, 8), (1000, 16), (2000, 32), (4000, 64), (6000, 128)):
        if it <= bound:
            return p_init / div
    return p_init / (256 if it <= 8000 else 512)


def mean_margin(score_fn: ScoreFn, x: NDArray[np.float32], y: NDArray[np.int64], votes: int) -> NDArray[np.float32]:
    """The margin of the mean of ``votes`` fresh queries (one query can be lucky under MI's randomness)."""
    probs = np.mean(np.stack([score_fn(x) for _ in range(votes)]), axis=0)
    return margin(probs.astype(np.float32), y)


def square_linf(
    score_fn: ScoreFn,
    x: NDArray[np.float32],
    y: NDArray[np.int64],
    *,
    eps: float,
    queries: int,
    gen: np.random.Generator,
    votes: int = 1,
    p_init: float = 0.8,
    progress: Callable[[int], None] | None = None,
) -> NDArray[np.float32]:
    """Untargeted L-inf Square attack spending ``queries`` per image to the end.

    Each candidate is judged by the mean of ``votes`` fresh queries, so a budget of ``queries`` gives
    ``queries // votes`` candidates per image (the first is the stripe initialisation). Images already
    misclassified keep being pushed (a lower margin survives more server draws): no early stop.
    """
    b, c, h, w = x.shape
    rounds = max(queries // votes, 1)
    x_best = np.clip(x + eps * gen.choice([-1.0, 1.0], size=(b, c, 1, w)), 0.0, 1.0).astype(np.float32)
    m_best = mean_margin(score_fn, x_best, y, votes)
    rows_h = np.arange(h)[None, :, None]
    cols_w = np.arange(w)[None, None, :]
    for it in range(1, rounds):
        if progress is not None:
            progress(1)
        s = round(float(np.sqrt(p_schedule(p_init, it, rounds) * h * w)))
        s = min(max(s, 1), h - 1)
        top = gen.integers(0, h - s + 1, size=b)[:, None, None]
        left = gen.integers(0, w - s + 1, size=b)[:, None, None]
        window = (rows_h >= top) & (rows_h < top + s) & (cols_w >= left) & (cols_w < left + s)  # (b, h, w)
        values = eps * gen.choice([-1.0, 1.0], size=(b, c, 1, 1))
        delta = np.where(window[:, None], values, x_best - x)
        x_new = np.clip(x + delta, 0.0, 1.0).astype(np.float32)
        m_new = mean_margin(score_fn, x_new, y, votes)
        better = m_new < m_best
        x_best[better] = x_new[better]
        m_best[better] = m_new[better]
    return x_best

"""Partner draws (issue 3 section 5): PL from the predicted class, OL uniform over the other classes, full coverage."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from service.errors import BundleError
from service.mi.engine import MIEngine
from service.mi.params import MIParams, Mode
from service.mi.pool import PoolIndex
from service.store import load_bundle, open_backend

#: significance for the goodness-of-fit tests; seeds are fixed, so these tests are deterministic
ALPHA = 1e-3


def _labels(counts: list[int]) -> np.ndarray:
    return np.repeat(np.arange(len(counts), dtype=np.int64), counts)


def test_pl_partners_always_come_from_the_predicted_class() -> None:
    labels = _labels([3, 1, 5, 2, 4])
    pool = PoolIndex(labels, 5)
    y_hat = np.random.default_rng(0).integers(0, 5, size=400)
    idx = pool.sample_same(y_hat, 7, np.random.default_rng(1))
    assert idx.shape == (400, 7) and idx.dtype == np.int64
    assert (labels[idx] == y_hat[:, None]).all()


def test_engine_pl_partners_follow_its_own_clean_prediction(tiny_bundle: Path) -> None:
    bundle = load_bundle(tiny_bundle)
    engine = MIEngine(open_backend(bundle), bundle.pool_labels, MIParams(threshold=0.0), seed=4)
    x = np.random.default_rng(0).random((64, 1, 8, 8), dtype=np.float32)
    res = engine(x, Mode.COMBINED, return_partners=True)
    assert res.partners is not None and res.flagged.any()
    y_hat = res.clean_probs.argmax(axis=1)
    assert (bundle.pool_labels[res.partners.pl] == y_hat[:, None]).all()
    ol = res.partners.ol[res.flagged]
    assert (bundle.pool_labels[ol] != y_hat[res.flagged][:, None]).all()


@pytest.mark.parametrize("n_classes", [2, 4, 10])
def test_ol_classes_are_never_the_prediction_and_uniform_over_the_others(n_classes: int) -> None:
    labels = _labels([2] * n_classes)
    pool = PoolIndex(labels, n_classes)
    gen = np.random.default_rng(2024)
    for y in range(n_classes):
        idx = pool.sample_other(np.full(1000, y), 30, gen)  # 30,000 draws with prediction y
        drawn = labels[idx].ravel()
        assert not (drawn == y).any()
        counts = np.bincount(drawn, minlength=n_classes)
        others = np.delete(counts, y)
        assert others.sum() == 30_000
        if n_classes > 2:
            assert stats.chisquare(others).pvalue > ALPHA, f"OL classes not uniform for y_hat={y}: {others}"
        else:
            assert others.tolist() == [30_000]


def test_draws_cover_the_whole_class_pool_uniformly() -> None:
    counts = [50, 7, 1, 23]
    labels = _labels(counts)
    pool = PoolIndex(labels, 4)
    gen = np.random.default_rng(7)
    for k, size in enumerate(counts):
        idx = pool.sample_same(np.full(2000, k), 10, gen).ravel()  # 20,000 draws in class k
        hits = np.bincount(idx - pool.starts[k], minlength=size)
        assert hits.size == size and (hits > 0).all(), f"class {k}: some pool images are never drawn"
        if size > 1:
            assert stats.chisquare(hits).pvalue > ALPHA
    # OL draws reach every image of every other class too
    idx = pool.sample_other(np.zeros(5000, dtype=np.int64), 10, gen).ravel()
    assert set(idx.tolist()) == set(range(counts[0], sum(counts)))


def test_the_closed_form_ol_draw_matches_the_reference_rejection_loop() -> None:
    """(y + 1 + u) mod C versus 'draw from all C, reject y': same distribution (chi-square homogeneity)."""
    n_classes, y = 6, 2
    pool = PoolIndex(_labels([1] * n_classes), n_classes)
    closed = pool.sample_other(np.full(12_000, y), 1, np.random.default_rng(0)).ravel()
    gen = np.random.default_rng(1)
    rejection = []
    while len(rejection) < 12_000:
        c = int(gen.integers(0, n_classes))
        if c != y:
            rejection.append(c)
    table = np.stack([np.bincount(closed, minlength=n_classes), np.bincount(rejection, minlength=n_classes)])
    table = np.delete(table, y, axis=1)
    assert stats.chi2_contingency(table).pvalue > ALPHA


def test_draws_are_with_replacement_across_the_n_blends() -> None:
    """5 draws from a class of 10: P(some image repeats in a row) = 1 - 10*9*8*7*6 / 10**5 = 0.6976."""
    pool = PoolIndex(_labels([10, 10]), 2)
    idx = pool.sample_same(np.zeros(4000, dtype=np.int64), 5, np.random.default_rng(0))
    repeats = sum(len(set(r)) < 5 for r in idx.tolist())
    assert stats.binomtest(repeats, 4000, 0.6976).pvalue > ALPHA, repeats


def test_pool_index_refuses_an_empty_class() -> None:
    with pytest.raises(BundleError, match=r"pool class 1 has 0 images, every class needs >= 1"):
        PoolIndex(np.array([0, 0, 2], dtype=np.int64), 3)

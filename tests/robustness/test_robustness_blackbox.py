"""The black-box interface shows what a stranger sees, and Square decides on several fresh queries to the end."""

from __future__ import annotations

import numpy as np
import pytest

from service.mi.params import Mode
from service.robustness.attacks import square
from service.robustness.blackbox import client_view, query_fn
from service.robustness.data import load_split
from service.robustness.served import ServedScorer


def test_label_detail_shows_label_flag_and_the_top_three_probabilities_only(mnist_bundle):
    x, _, _ = load_split(mnist_bundle, "test", 8)
    engine = ServedScorer.from_bundle(mnist_bundle, [0]).engine
    res = engine(x, Mode.COMBINED, rng=np.random.default_rng(0))
    full, label = client_view(res, "full"), client_view(res, "label")
    np.testing.assert_array_equal(full.probs, res.probs)
    np.testing.assert_array_equal(label.label, res.label)
    np.testing.assert_array_equal(label.flagged, res.flagged)
    for row, probs in zip(label.probs, res.probs, strict=True):
        top3 = set(np.argsort(-probs)[:3].tolist())
        assert set(np.flatnonzero(row).tolist()) <= top3
        np.testing.assert_array_equal(row[sorted(top3)], probs[sorted(top3)])
    with pytest.raises(ValueError, match="response detail 'scores'"):
        client_view(res, "scores")
    view = query_fn(engine, "label")(x)
    assert (np.count_nonzero(view.probs, axis=1) <= 3).all()


def test_square_spends_the_whole_budget_and_averages_several_queries_per_decision():
    calls = []

    def always_wrong(imgs):
        calls.append(imgs.shape[0])
        probs = np.zeros((imgs.shape[0], 3), dtype=np.float32)
        probs[:, 1] = 1.0  # class 1 for everything: label 0 is misclassified from the first query
        return probs

    x = np.full((5, 1, 8, 8), 0.5, dtype=np.float32)
    y = np.zeros(5, dtype=np.int64)
    square.square_linf(always_wrong, x, y, eps=0.1, queries=40, votes=4, gen=np.random.default_rng(0))
    assert len(calls) == 40 and set(calls) == {5}  # 10 decisions x 4 queries, every image, no early stop


def test_mean_margin_judges_the_mean_of_the_votes_not_one_lucky_query():
    answers = iter([np.array([[0.9, 0.1]]), np.array([[0.2, 0.8]]), np.array([[0.9, 0.1]])])
    m = square.mean_margin(lambda _: next(answers).astype(np.float32), np.zeros((1, 1, 2, 2)), np.array([0]), 3)
    assert m[0] == pytest.approx((2 / 3 * 0.9 + 0.2 / 3) - (2 / 3 * 0.1 + 0.8 / 3))

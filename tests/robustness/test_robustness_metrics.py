"""Baselines, metrics, checks and budgets on hand-made inputs with known answers (CIFAR-sized shapes included)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from service.robustness import checks, metrics
from service.robustness.baselines import crop_pad, crop_resize, gaussian_noise, predict_baseline, random_rotation
from service.robustness.budgets import BUDGETS, get_budget, threat_for


def test_crop_pad_keeps_an_s_by_s_block_with_s_in_the_scaled_range():
    gen = torch.Generator().manual_seed(0)
    out = crop_pad(torch.ones(200, 3, 32, 32), gen)
    rows = (out[:, 0] > 0).any(dim=2).sum(dim=1)
    cols = (out[:, 0] > 0).any(dim=1).sum(dim=1)
    assert torch.equal(rows, cols)
    assert rows.min() >= 24 and rows.max() <= 32 and rows.unique().numel() > 4
    assert torch.equal(out.sum(dim=(1, 2, 3)), 3 * rows.float() ** 2)  # a full block of ones, zeros elsewhere
    small = crop_pad(torch.ones(200, 1, 28, 28), gen)
    side = (small[:, 0] > 0).any(dim=2).sum(dim=1)
    assert side.min() >= 21 and side.max() <= 28


def test_crop_resize_and_rotation_keep_shapes_and_constant_images():
    gen = torch.Generator().manual_seed(1)
    ones = torch.ones(16, 3, 32, 32)
    torch.testing.assert_close(crop_resize(ones, gen), ones)
    rot = random_rotation(ones, gen)
    assert rot.shape == ones.shape and torch.allclose(rot[:, :, 16, 16], torch.ones(16, 3))
    noise = gaussian_noise(torch.zeros(64, 1, 28, 28), gen)
    assert abs(noise.std().item() - 0.025) < 0.002


def test_predict_baseline_averages_probabilities_over_draws():
    gen = torch.Generator().manual_seed(2)
    x = torch.rand(5, 1, 8, 8)
    probs = predict_baseline(lambda t: t.flatten(1)[:, :3] * 10, gaussian_noise, x, 7, gen=gen, max_batch=10)
    assert probs.shape == (5, 3)
    torch.testing.assert_close(probs.sum(1), torch.ones(5))


def test_auroc_and_roc_on_known_scores():
    assert metrics.auroc(np.array([0.0, 0.1]), np.array([0.5, 0.9])) == 1.0
    assert metrics.auroc(np.array([0.5, 0.9]), np.array([0.0, 0.1])) == 0.0
    assert metrics.auroc(np.array([0.3, 0.3]), np.array([0.3])) == 0.5
    assert np.isnan(metrics.auroc(np.array([]), np.array([1.0])))
    fpr, tpr = metrics.roc_curve(np.array([0.0, 0.1]), np.array([0.5, 0.9]))
    assert fpr[0] == 0 and tpr[-1] == 1 and np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)


def test_seed_accuracy_counts_an_image_only_if_every_seed_is_right():
    correct = np.array([[1, 1, 0, 1], [1, 0, 0, 1], [1, 1, 0, 1]], dtype=bool)
    s = metrics.seed_accuracy(correct)
    assert s.per_seed == [0.75, 0.5, 0.75]
    assert s.worst == 0.5 and s.min == 0.5 and s.max == 0.75


def test_robustness_improving_condition_signs():
    base = np.array([[0.1, 0.9], [0.2, 0.8]], dtype=np.float32)  # both wrong (true class 0)
    better = np.array([[0.6, 0.4], [0.3, 0.7]], dtype=np.float32)
    ric = metrics.robustness_improving_condition(base, better, np.array([0, 0]))
    assert ric.n == 2 and ric.true_up > 0 and ric.adv_down > 0 and ric.holds == 1.0
    worse = metrics.robustness_improving_condition(better, base, np.array([0, 0]))
    assert worse.n == 1 and worse.holds == 0.0


def test_checks_warn_without_raising():
    assert checks.check_adaptive_vs_oblivious({"pgd": 0.1, "eot-combined": 0.5}, "pgd", ("eot-combined",))
    assert not checks.check_adaptive_vs_oblivious({"pgd": 0.5, "eot-combined": 0.1}, "pgd", ("eot-combined",))
    assert checks.check_blackbox_vs_whitebox({"square": 0.1, "eot-combined": 0.5}, "square", ("eot-combined",))
    assert checks.check_zero_gradients(np.array([0.0, 0.0, 1.0]))
    assert not checks.check_zero_gradients(np.array([1.0, 2.0]))
    varying = np.array([[1, 2, 3], [1, 2, 4]])
    assert any("EOT" in w for w in checks.check_randomness(varying, eot=1, seeds=3))
    assert any(">= 3" in w for w in checks.check_randomness(varying, eot=8, seeds=2))


def test_budgets_and_threat_models():
    assert threat_for((1, 28, 28)).eps == 0.3 and threat_for((1, 28, 28)).eps_curve == (0.1, 0.2, 0.3)
    assert threat_for((3, 32, 32)).eps == pytest.approx(8 / 255)
    paper = BUDGETS["paper"]
    assert paper.adaptive_steps >= 200 and paper.eot >= 16 and paper.restarts >= 5  # SPEC 9.3 minimums
    assert get_budget("cpu", n_images=7).n_images == 7
    with pytest.raises(ValueError, match="unknown budget"):
        get_budget("huge")
    assert "budget `quick`" in BUDGETS["quick"].describe()


def test_clopper_pearson_matches_known_exact_intervals():
    # reference values of the exact binomial interval (e.g. R's binom.test)
    lo, hi = metrics.clopper_pearson(41, 100)
    assert abs(lo - 0.3126) < 1e-3 and abs(hi - 0.5128) < 1e-3
    assert metrics.clopper_pearson(0, 40) == (0.0, pytest.approx(0.0881, abs=1e-3))
    assert metrics.clopper_pearson(5, 5)[1] == 1.0


def test_seed_accuracy_interval_is_that_of_the_all_seeds_count():
    correct = np.array([[1, 1, 0, 1], [1, 0, 0, 1]], dtype=bool)
    stats = metrics.seed_accuracy(correct)
    assert stats.worst == 0.5 and stats.ci == metrics.clopper_pearson(2, 4)

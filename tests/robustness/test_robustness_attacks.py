"""Attacks do what they claim on a small real MNIST model, and never leave the eps-ball or [0, 1]."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from service.mi.params import Mode
from service.robustness.attacks import eot_combined, ol_direct, pgd, pl_aware, square
from service.robustness.attacks.core import project, quantize
from service.robustness.data import load_split
from service.robustness.pipeline import DifferentiableMI
from service.robustness.served import ServedScorer
from service.store import open_backend

N = 20


@pytest.fixture(scope="module")
def twin(mnist_bundle):
    return DifferentiableMI.from_bundle(mnist_bundle)


@pytest.fixture(scope="module")
def data(mnist_bundle):
    x, y, _ = load_split(mnist_bundle, "test", N)
    return torch.from_numpy(x), torch.from_numpy(y)


def _served_plain_accuracy(bundle, x: np.ndarray, y: np.ndarray) -> float:
    backend = open_backend(bundle, providers=["CPUExecutionProvider"])
    return float((backend.probs(x).argmax(1) == y).mean())


def test_pgd_lowers_the_accuracy_of_the_undefended_model(mnist_bundle, twin, data):
    x, y = data
    clean = _served_plain_accuracy(mnist_bundle, x.numpy(), y.numpy())
    assert clean >= 0.7, f"fixture model too weak to test attacks: {clean}"
    x_adv = quantize(pgd.pgd_untargeted(twin.logits, x, y, eps=0.2, step=0.02, steps=15), x, 0.2)
    adv = _served_plain_accuracy(mnist_bundle, x_adv.numpy(), y.numpy())
    assert adv <= clean - 0.5, (clean, adv)


def test_targeted_pgd_reaches_its_target(mnist_bundle, twin, data):
    x, y = data
    target = pgd.random_targets(y, 10, np.random.default_rng(0))
    assert (target != y).all()
    x_adv = quantize(pgd.pgd_targeted(twin.logits, x, target, eps=0.3, step=0.02, steps=30), x, 0.3)
    backend = open_backend(mnist_bundle, providers=["CPUExecutionProvider"])
    hit = (backend.probs(x_adv.numpy()).argmax(1) == target.numpy()).mean()
    assert hit >= 0.8, hit


def test_random_targets_are_uniform_over_the_other_classes():
    y = torch.zeros(20000, dtype=torch.int64) + 3
    t = pgd.random_targets(y, 10, np.random.default_rng(1)).numpy()
    counts = np.bincount(t, minlength=10)
    assert counts[3] == 0
    assert np.all(np.abs(counts[np.arange(10) != 3] / 20000 - 1 / 9) < 0.01)


def _run(name, twin, scorer, x, y, eps):
    gen = np.random.default_rng(0)
    kw = {"eps": eps, "step": 0.05, "steps": 3, "eot": 2, "gen": gen}
    if name == "pgd":
        return pgd.pgd_untargeted(twin.logits, x, y, eps=eps, step=0.05, steps=3, restarts=2)
    if name == "eot-combined":
        return eot_combined.eot_pgd_combined(twin, x, y, **kw)
    if name == "pl-aware":
        return pl_aware.pl_aware_pgd(twin, x, y, **kw)
    if name == "ol-direct":
        return ol_direct.ol_direct_pgd(twin, x, y, **kw)
    return torch.from_numpy(square.square_linf(scorer.fresh_probs, x.numpy(), y.numpy(), eps=eps, queries=15, gen=gen))


@pytest.mark.parametrize("name", ["pgd", "eot-combined", "pl-aware", "ol-direct", "square"])
def test_every_attack_stays_within_eps_and_the_valid_range(mnist_bundle, twin, data, name):
    x, y = data[0][:6], data[1][:6]
    eps = 0.1
    scorer = ServedScorer.from_bundle(mnist_bundle, [0])
    raw = _run(name, twin, scorer, x, y, eps)
    for x_adv in (raw, quantize(raw, x, eps)):
        assert x_adv.shape == x.shape and x_adv.dtype == torch.float32
        assert (x_adv - x).abs().max() <= eps + 1e-6
        assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
    q = quantize(raw, x, eps)
    assert torch.equal(torch.round(q * 255), q * 255)  # on the 8-bit grid
    assert (q != x).any()  # it did perturb


def test_quantize_never_leaves_the_ball_even_where_rounding_would():
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (50, 1, 6, 6), generator=gen).float() / 255
    for eps in (0.3, 8 / 255, 0.1):
        x_adv = project(x + (torch.rand(x.shape, generator=gen) * 2 - 1) * 2 * eps, x, eps)
        q = quantize(x_adv, x, eps)
        assert (q - x).abs().max() <= eps + 1e-7
        assert q.min() >= 0 and q.max() <= 1
        assert (q - x_adv).abs().max() <= 1 / 255 + 1e-6


def test_square_attack_breaks_an_undefended_model_without_gradients(mnist_bundle, data):
    x, y = data
    backend = open_backend(mnist_bundle, providers=["CPUExecutionProvider"])
    clean = (backend.probs(x.numpy()).argmax(1) == y.numpy()).mean()
    x_adv = square.square_linf(backend.probs, x.numpy(), y.numpy(), eps=0.3, queries=150, gen=np.random.default_rng(0))
    adv = (backend.probs(quantize(torch.from_numpy(x_adv), x, 0.3).numpy()).argmax(1) == y.numpy()).mean()
    assert adv <= clean - 0.3, (clean, adv)


def test_eot_attack_through_mi_lowers_served_mi_accuracy(mnist_bundle, twin, data):
    x, y = data
    scorer = ServedScorer.from_bundle(mnist_bundle, [11, 12, 13])
    clean = (scorer.score(x.numpy(), Mode.COMBINED).label == y.numpy()).all(axis=0).mean()
    gen = np.random.default_rng(0)
    x_adv = eot_combined.eot_pgd_combined(twin, x, y, eps=0.3, step=0.05, steps=10, eot=2, gen=gen)
    adv = (scorer.score(quantize(x_adv, x, 0.3).numpy(), Mode.COMBINED).label == y.numpy()).all(axis=0).mean()
    # the fixture model is not mixup-trained, so MI's clean accuracy is modest; the attack must still halve it
    assert clean >= 0.2 and adv <= 0.5 * clean, (clean, adv)


def test_evaluation_subsets_cover_every_class_although_splits_are_class_sorted(mnist_bundle):
    # mnist5k rows are sorted by class and split indices are stored sorted: the first 30 would be all zeros
    _, y, idx = load_split(mnist_bundle, "test", 30)
    assert np.unique(y).size >= 7
    _, _, idx_again = load_split(mnist_bundle, "test", 30)
    np.testing.assert_array_equal(idx, idx_again)  # fixed seed: every run sees the same images

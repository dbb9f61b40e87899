"""The batched MI engine against the plain per-image reference, on a tiny real ONNX model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from service.backends.onnx import OrtBackend
from service.errors import InvalidInputError
from service.mi.detection import detection_gap, is_flagged
from service.mi.engine import MIEngine, Partners
from service.mi.params import Branch, MIParams, MixSpec, Mode
from service.mi.reference import reference_mi
from service.store import Bundle, load_bundle, open_backend

#: about half of the tiny model's gaps on uniform-noise inputs are above this (both branches get exercised)
THRESHOLD = 0.04
PARAMS = MIParams(
    lam_pl=0.5,
    n_pl=5,
    threshold=THRESHOLD,
    threshold_rule=f"fixed={THRESHOLD}",
    ol_combined=MixSpec(lam=0.4, n=15),
    ol_standalone=MixSpec(lam=0.5, n=7),
)


@pytest.fixture
def bundle(tiny_bundle: Path) -> Bundle:
    return load_bundle(tiny_bundle)


@pytest.fixture
def backend(bundle: Bundle) -> OrtBackend:
    return open_backend(bundle, mixing="host", intra_op_threads=1)


@pytest.fixture
def engine(bundle: Bundle, backend: OrtBackend) -> MIEngine:
    return MIEngine(backend, bundle.pool_labels, PARAMS, seed=123)


def _images(b: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((b, 1, 8, 8), dtype=np.float32)


@pytest.mark.parametrize("mode", [Mode.COMBINED, Mode.PL, Mode.OL, Mode.OFF])
def test_engine_matches_per_image_reference_with_same_partners(
    mode: Mode, engine: MIEngine, backend: OrtBackend, bundle: Bundle
) -> None:
    x = _images(24)
    res = engine(x, mode, return_partners=True)
    assert res.partners is not None
    ref = reference_mi(
        backend.logits,
        bundle.pool_images,
        bundle.pool_labels,
        PARAMS,
        x,
        mode=mode,
        pl_partners=res.partners.pl,
        ol_partners=res.partners.ol,
    )
    np.testing.assert_allclose(res.probs, ref.probs, atol=1e-5, rtol=0)
    np.testing.assert_allclose(res.clean_probs, ref.clean_probs, atol=1e-6, rtol=0)
    np.testing.assert_array_equal(res.label, ref.label)
    np.testing.assert_array_equal(res.flagged, ref.flagged)
    assert res.branch == ref.branch
    np.testing.assert_array_equal(res.n_mixes + 1, ref.n_forwards)
    # the partners the engine drew (the reference was handed them, so comparing with its echo proves nothing):
    # PL from the predicted class, OL from the other classes and only where the reference ran OL, -1 elsewhere
    y_hat = ref.clean_probs.argmax(axis=1)
    ran_pl = np.array([mode in (Mode.COMBINED, Mode.PL)] * len(x))
    ran_ol = np.array([b is Branch.OL for b in ref.branch])
    assert (bundle.pool_labels[res.partners.pl[ran_pl]] == y_hat[ran_pl][:, None]).all()
    assert (res.partners.pl[~ran_pl] == -1).all() and (res.partners.ol[~ran_ol] == -1).all()
    assert (res.partners.ol[ran_ol] >= 0).all()
    assert (bundle.pool_labels[res.partners.ol[ran_ol]] != y_hat[ran_ol][:, None]).all()
    if mode in (Mode.COMBINED, Mode.PL):
        np.testing.assert_allclose(res.gap, ref.gap, atol=1e-5, rtol=0)
    else:
        assert np.isnan(res.gap).all() and np.isnan(ref.gap).all()
    if mode is Mode.COMBINED:  # the comparison only means something if both branches answered
        assert 0 < res.flagged.sum() < len(x)


def test_branches_and_costs_per_mode(engine: MIEngine) -> None:
    x = _images(16)
    comb = engine(x, Mode.COMBINED)
    expected_branch = tuple(Branch.OL if f else Branch.PL for f in comb.flagged)
    assert comb.branch == expected_branch
    np.testing.assert_array_equal(comb.n_mixes, np.where(comb.flagged, 5 + 15, 5))
    assert engine(x, Mode.PL).n_mixes.tolist() == [5] * 16
    assert engine(x, Mode.OL).n_mixes.tolist() == [7] * 16
    off = engine(x, Mode.OFF)
    assert off.n_mixes.tolist() == [0] * 16 and off.branch == (Branch.OFF,) * 16
    np.testing.assert_array_equal(off.probs, off.clean_probs)
    for res in (comb, off):
        np.testing.assert_allclose(res.probs.sum(axis=1), 1.0, atol=1e-5)
        np.testing.assert_array_equal(res.label, res.probs.argmax(axis=1))


def test_lazy_ol_returns_what_computing_both_branches_for_all_returns(
    engine: MIEngine, backend: OrtBackend, bundle: Bundle
) -> None:
    """Exact argument: give both the lazy engine and the eager reference OL partners for EVERY image.

    The eager reference computes q_OL for all images and selects; the lazy engine computes it only where flagged.
    Same draws -> identical outputs, so the two procedures define the same output distribution.
    """
    x = _images(24, seed=5)
    first = engine(x, Mode.COMBINED, return_partners=True)
    assert first.partners is not None
    gen = np.random.default_rng(9)
    y_hat = first.clean_probs.argmax(axis=1)
    ol_all = engine.pool.sample_other(y_hat, PARAMS.ol_combined.n, gen)  # OL draws for every image
    lazy = engine(x, Mode.COMBINED, partners=Partners(first.partners.pl, ol_all), return_partners=True)
    eager = reference_mi(
        backend.logits,
        bundle.pool_images,
        bundle.pool_labels,
        PARAMS,
        x,
        mode=Mode.COMBINED,
        pl_partners=first.partners.pl,
        ol_partners=ol_all,
        both_branches=True,
    )
    assert int(eager.n_forwards.min()) == 1 + 5 + 15  # the eager reference paid for OL everywhere
    assert 0 < lazy.flagged.sum() < len(x)
    np.testing.assert_allclose(lazy.probs, eager.probs, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(lazy.label, eager.label)
    # and unflagged outputs do not depend on the OL draws at all
    other_ol = engine.pool.sample_other(y_hat, PARAMS.ol_combined.n, np.random.default_rng(10))
    again = engine(x, Mode.COMBINED, partners=Partners(first.partners.pl, other_ol))
    keep = ~lazy.flagged
    np.testing.assert_array_equal(again.probs[keep], lazy.probs[keep])
    assert not np.allclose(again.probs[~keep], lazy.probs[~keep], atol=1e-6)


def test_results_do_not_depend_on_batch_composition(engine: MIEngine) -> None:
    x = _images(12, seed=3)
    full = engine(x, Mode.COMBINED, return_partners=True)
    assert full.partners is not None
    order = np.random.default_rng(0).permutation(12)
    for rows in (order, order[:1], order[3:8], np.array([11, 0])):
        part = engine(x[rows], Mode.COMBINED, partners=Partners(full.partners.pl[rows], full.partners.ol[rows]))
        np.testing.assert_allclose(part.probs, full.probs[rows], atol=1e-5, rtol=0)
        np.testing.assert_allclose(part.gap, full.gap[rows], atol=1e-5, rtol=0)
        np.testing.assert_array_equal(part.flagged, full.flagged[rows])
        np.testing.assert_array_equal(part.label, full.label[rows])


def test_gap_uses_the_largest_pl_entry_not_the_entry_at_the_prediction() -> None:
    clean = np.array([[0.75, 0.25], [0.5, 0.5]], dtype=np.float32)
    pl = np.array([[0.375, 0.625], [0.25, 0.75]], dtype=np.float32)
    # row 0: c = 0.75, max q_PL = 0.625 (class 1, not the predicted class 0) -> 0.125, not 0.75 - 0.375
    # row 1: c = 0.5, max q_PL = 0.75 -> -0.25 (a negative gap is fine: confidence rose)
    gap = detection_gap(clean, pl)
    np.testing.assert_array_equal(gap, np.array([0.125, -0.25], dtype=np.float32))
    assert is_flagged(gap, 0.125).tolist() == [True, False]  # equality counts as flagged
    assert is_flagged(gap, float(np.nextafter(np.float32(0.125), np.float32(1)))).tolist() == [False, False]
    assert is_flagged(gap, 0.0).tolist() == [True, False]


def test_the_one_flag_rule_flags_torch_gaps_like_numpy_gaps() -> None:
    """The evaluation twin calls the serving rule on torch tensors: same flags at and around a float32 threshold."""
    torch = pytest.importorskip("torch")
    threshold = 0.2  # not exact in float32: compared in float32 on both sides
    t32 = float(np.float32(threshold))
    gaps = np.array([t32, np.nextafter(np.float32(t32), np.float32(0)), 0.3, -0.1], dtype=np.float32)
    flags = is_flagged(gaps, threshold)
    assert flags.tolist() == [True, False, True, False]
    assert is_flagged(torch.from_numpy(gaps), threshold).tolist() == flags.tolist()


def test_engine_flags_an_image_whose_gap_equals_the_threshold(engine: MIEngine, bundle: Bundle) -> None:
    x = _images(6, seed=4)
    first = engine(x, Mode.COMBINED, return_partners=True)
    assert first.partners is not None
    i = int(np.argmax(first.gap))
    at = MIEngine(engine.backend, bundle.pool_labels, PARAMS.model_copy(update={"threshold": float(first.gap[i])}))
    res = at(x, Mode.COMBINED, partners=Partners(first.partners.pl, first.partners.ol))
    assert res.gap[i] == first.gap[i]
    assert res.flagged[i] and res.branch[i] is Branch.OL
    assert res.flagged.sum() == 1  # i has the largest gap: every other image is strictly below


def test_seeded_engines_repeat_and_unseeded_ones_differ(bundle: Bundle, backend: OrtBackend) -> None:
    x = _images(8)
    a = MIEngine(backend, bundle.pool_labels, PARAMS, seed=7)(x, return_partners=True)
    b = MIEngine(backend, bundle.pool_labels, PARAMS, seed=7)(x, return_partners=True)
    c = MIEngine(backend, bundle.pool_labels, PARAMS)(x, return_partners=True)
    assert a.partners is not None and b.partners is not None and c.partners is not None
    np.testing.assert_array_equal(a.partners.pl, b.partners.pl)
    np.testing.assert_array_equal(a.probs, b.probs)
    assert not np.array_equal(a.partners.pl, c.partners.pl)


def test_warmup_does_not_advance_the_random_stream(bundle: Bundle, backend: OrtBackend) -> None:
    x = _images(4)
    cold = MIEngine(backend, bundle.pool_labels, PARAMS, seed=1)
    warm = MIEngine(backend, bundle.pool_labels, PARAMS, seed=1)
    warm.warmup((1, 4))
    a, b = cold(x, return_partners=True), warm(x, return_partners=True)
    assert a.partners is not None and b.partners is not None
    np.testing.assert_array_equal(a.partners.pl, b.partners.pl)


def test_partners_are_only_attached_when_asked(engine: MIEngine) -> None:
    assert engine(_images(2)).partners is None


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ((2, 3, 8, 8), r"images must be shaped \(-1, 1, 8, 8\) \(B,C,H,W\), got \(2, 3, 8, 8\)"),
        ((2, 1, 8), r"got \(2, 1, 8\)"),
        ((2, 1, 9, 8), r"got \(2, 1, 9, 8\)"),
        ((0, 1, 8, 8), r"at least 1 image, got 0"),
    ],
)
def test_engine_rejects_wrong_image_shapes(engine: MIEngine, shape: tuple[int, ...], message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        engine(np.zeros(shape, dtype=np.float32))


def test_engine_rejects_partners_of_the_wrong_shape(engine: MIEngine) -> None:
    bad = Partners(np.zeros((2, 4), dtype=np.int64), np.zeros((2, 15), dtype=np.int64))
    with pytest.raises(ValueError, match=r"pl partners must be shaped \(2, 5\), got \(2, 4\)"):
        engine(_images(2), partners=bad)


def test_engine_and_reference_agree_in_distribution_with_their_own_draws(
    engine: MIEngine, backend: OrtBackend, bundle: Bundle
) -> None:
    """Statistical check, independent draws: the engine (closed-form OL classes, lazy OL) and the reference
    (rejection loop, both branches) give the same mean output and flag rate on one image, within 5 standard errors."""
    candidates = _images(16, seed=11)
    rates = engine(np.repeat(candidates, 50, axis=0), Mode.COMBINED).flagged.reshape(16, 50).mean(axis=1)
    pick = int(np.argmin(np.abs(rates - 0.5)))  # the image whose flag decision is most random
    x = np.repeat(candidates[pick : pick + 1], 400, axis=0)  # one image, 400 independent MI evaluations
    eng = engine(x, Mode.COMBINED)
    ref = reference_mi(
        backend.logits,
        bundle.pool_images,
        bundle.pool_labels,
        PARAMS,
        x,
        mode=Mode.COMBINED,
        rng=np.random.default_rng(77),
        both_branches=True,
    )
    assert 0.05 < eng.flagged.mean() < 0.95, rates
    for a, b in ((eng.probs, ref.probs), (eng.flagged[:, None].astype(float), ref.flagged[:, None].astype(float))):
        se = np.sqrt(a.var(axis=0) / len(a) + b.var(axis=0) / len(b)) + 1e-9
        assert (np.abs(a.mean(axis=0) - b.mean(axis=0)) < 5 * se).all()

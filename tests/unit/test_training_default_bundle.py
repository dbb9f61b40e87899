"""The committed bundles: every hash verifies, and their recorded numbers are recomputed exactly from the files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from service.store import load_bundle, resolve_bundle
from service.training.bundle import recompute_numbers
from service.training.datasets import load_dataset

STORE = Path(__file__).resolve().parents[2] / "model_store"
BUNDLES = [STORE / name / v for name in ("mnist-mixup", "mnist-iat") for v in ("1", "2")]
#: each derived version: its source, the MI fields it changes and their OL λ (the λ sweeps' picks:
#: docs/robustness/mnist-mixup-eps0.1/sweep, docs/robustness/mnist-iat/sweep)
DERIVED = {
    "mnist-mixup/2": ("mnist-mixup/1", {"ol_combined": 0.5}),
    "mnist-iat/2": ("mnist-iat/1", {"ol_combined": 0.8, "ol_standalone": 0.8}),
}


def _present(path: Path) -> Path:
    if path.parent.name == "mnist-iat" and not path.exists():
        pytest.skip(f"mnist-iat/{path.name} is not committed")
    return path


@pytest.mark.parametrize("derived", sorted(DERIVED))
def test_a_derived_version_shares_its_source_files_and_changes_only_the_shipped_lambdas(derived):
    source, lams = DERIVED[derived]
    v1, v2 = (load_bundle(_present(STORE / b)).manifest for b in (source, derived))
    assert v2.files == v1.files and v2.recipe.training["derived_from"] == source
    changed = {k for k in v1.mi.model_dump() if getattr(v1.mi, k) != getattr(v2.mi, k)}
    assert changed == set(lams)
    for field, lam in lams.items():
        assert (getattr(v2.mi, field).lam, getattr(v2.mi, field).n) == (lam, getattr(v1.mi, field).n)


@pytest.mark.parametrize("path", BUNDLES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_committed_bundle_verifies_and_matches_its_dataset(path):
    bundle = load_bundle(_present(path), require_weights=True)  # every sha256, the ONNX model, splits, pool
    m = bundle.manifest
    ds = load_dataset(m.dataset.name)
    assert ds.sha256 == m.dataset.sha256
    assert np.array_equal(bundle.pool_images, ds.images[bundle.splits["pool"]])
    assert np.array_equal(bundle.pool_labels, ds.labels[bundle.splits["pool"]])
    assert np.isin(bundle.splits["pool"], bundle.splits["train"]).all()


@pytest.mark.slow
@pytest.mark.parametrize("path", BUNDLES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_committed_bundle_numbers_are_recomputed_exactly_with_the_recorded_seed(path):
    m = load_bundle(_present(path)).manifest
    again = recompute_numbers(path)
    assert again["accuracy"]["mi_combined"] == m.accuracy.mi_combined
    assert again["accuracy"] == m.accuracy.model_dump()
    assert again["calibration"] == m.calibration.model_dump()
    assert again["threshold"] == m.mi.threshold


def test_served_default_bundle_is_the_newest_and_reaches_the_accuracy_aim():
    assert resolve_bundle(STORE, "mnist-mixup") == STORE / "mnist-mixup" / "2"  # what `make serve` serves
    m = load_bundle(resolve_bundle(STORE, "mnist-mixup")).manifest
    assert m.accuracy.n_images == 1000
    assert m.accuracy.plain >= 0.98, f"plain clean accuracy {m.accuracy.plain} below the 0.98 aim"
    assert m.calibration.false_flag_rate <= 0.05

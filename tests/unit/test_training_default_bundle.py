"""The committed bundles: every hash verifies, and their recorded numbers are recomputed exactly from the files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from service.store import load_bundle
from service.training.bundle import recompute_numbers
from service.training.datasets import load_dataset

STORE = Path(__file__).resolve().parents[2] / "model_store"
BUNDLES = [STORE / "mnist-mixup" / "1", STORE / "mnist-iat" / "1", STORE / "mnist-iat" / "2"]


def _present(path: Path) -> Path:
    if path.parent.name == "mnist-iat" and not path.exists():
        pytest.skip(f"mnist-iat/{path.name} is not committed")
    return path


def test_a_derived_version_shares_its_source_files_and_changes_only_the_shipped_lambdas():
    v1, v2 = (load_bundle(_present(STORE / "mnist-iat" / v)).manifest for v in ("1", "2"))
    assert v2.files == v1.files and v2.recipe.training["derived_from"] == "mnist-iat/1"
    changed = {k for k in v1.mi.model_dump() if getattr(v1.mi, k) != getattr(v2.mi, k)}
    assert changed == {"ol_combined", "ol_standalone"}  # the λ sweep's picks (docs/robustness/mnist-iat-2/sweep)
    assert (v2.mi.ol_combined.lam, v2.mi.ol_standalone.lam) == (0.8, 0.8)
    assert (v2.mi.ol_combined.n, v2.mi.ol_standalone.n) == (v1.mi.ol_combined.n, v1.mi.ol_standalone.n)


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


def test_default_bundle_reaches_the_accuracy_aim():
    m = load_bundle(STORE / "mnist-mixup" / "1").manifest
    assert m.accuracy.n_images == 1000
    assert m.accuracy.plain >= 0.98, f"plain clean accuracy {m.accuracy.plain} below the 0.98 aim"
    assert m.calibration.false_flag_rate <= 0.05

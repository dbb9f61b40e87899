"""Imported models behind a real server: mode ``off`` answers as the user's original model does (same labels,
probabilities within the parity tolerance); MI-Combined answers as the in-process engine at the same seed."""

from __future__ import annotations

import numpy as np
import pytest
from importmodels import VARIANTS, Variant, class_images, import_variant, reference_probs, write_folder
from mixserver import png_bytes, run_server, settings_for

from service.mi.engine import MIEngine
from service.mi.params import Mode
from service.store import load_bundle, open_backend

pytestmark = pytest.mark.integration

SEED = 5
CASES = [*VARIANTS, Variant("fixed-batch-1-hardcoded-reshape", batch=1)]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp("import-http") / "images")


@pytest.mark.parametrize("variant", CASES, ids=lambda v: v.name)
def test_imported_model_served(variant, data, tmp_path):
    bundle_dir = import_variant(
        variant, tmp_path, data, tmp_path / "store", hardcoded_reshape="hardcoded" in variant.name
    )
    bundle = load_bundle(bundle_dir)
    m = bundle.manifest
    rng = np.random.default_rng(21)
    images = np.concatenate([class_images(k, 4, rng) for k in range(3)])  # (12, 3, 8, 8) uint8
    files = [("images", (f"{i}.png", png_bytes(img.transpose(1, 2, 0)), "image/png")) for i, img in enumerate(images)]
    want_off = reference_probs(variant, tmp_path / f"{variant.name}.onnx", images)
    x = images.astype(np.float32) * np.float32(1.0 / 255.0)  # the server's decoder scales so (service.preprocess)
    engine = MIEngine(open_backend(bundle, providers=["CPUExecutionProvider"]), bundle.pool_labels, m.mi, seed=SEED)
    want_mi = engine(x, Mode.COMBINED)
    settings = settings_for(tmp_path / "store", name=variant.name, seed=SEED, allow_mode_override=True)
    with run_server(settings) as srv:
        combined = srv.client.post("/predict", files=files)  # the first draws of the seeded server
        off = srv.client.post("/predict", params={"mode": "off"}, files=files)
    assert off.status_code == 200 and combined.status_code == 200, (off.text, combined.text)
    names = list(m.class_names)
    got_off = np.array([[p["probabilities"][n] for n in names] for p in off.json()["predictions"]])
    assert [p["class_index"] for p in off.json()["predictions"]] == want_off.argmax(1).tolist()
    assert np.max(np.abs(got_off - want_off)) <= m.imported.parity.tol
    preds = combined.json()["predictions"]
    assert [p["class_index"] for p in preds] == want_mi.label.tolist()
    assert [p["adversarial"] for p in preds] == want_mi.flagged.tolist()
    got_mi = np.array([[p["probabilities"][n] for n in names] for p in preds])
    np.testing.assert_allclose(got_mi, want_mi.probs, rtol=0, atol=1e-6)


@pytest.mark.parametrize("variant", CASES, ids=lambda v: v.name)
def test_fused_mixing_graph_agrees_with_host_mixing(variant, data, tmp_path):
    """The fused MI graph (the GPU path) wraps the served graph, adapters and Scan included; run on the CPU
    provider here, it gives the host path's numbers on the same partners."""
    bundle = load_bundle(
        import_variant(variant, tmp_path, data, tmp_path / "store", hardcoded_reshape="hardcoded" in variant.name)
    )
    rng = np.random.default_rng(4)
    x = np.concatenate([class_images(k, 3, rng) for k in range(3)]).astype(np.float32) / np.float32(255.0)
    partners = rng.integers(0, bundle.pool_labels.size, size=(x.shape[0], 5))
    host = open_backend(bundle, providers=["CPUExecutionProvider"], mixing="host")
    fused = open_backend(bundle, providers=["CPUExecutionProvider"], mixing="fused")
    np.testing.assert_allclose(fused.mean_mix_probs(x, partners, 0.5), host.mean_mix_probs(x, partners, 0.5), atol=1e-5)
    np.testing.assert_allclose(fused.probs(x), host.probs(x), atol=1e-6)

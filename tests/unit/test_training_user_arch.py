"""`mixinfer bundle --arch PACKAGE.MODULE:FACTORY`: a user's own torch module trained with the project's recipe."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from service.cli import main
from service.store import load_bundle
from service.training.models import build_model, load_bundle_model


@pytest.mark.slow
def test_bundle_trains_a_user_factory_and_the_twin_rebuilds_it(tmp_path):
    store = tmp_path / "store"
    args = ["bundle", "--arch", "usernet:make", "--epochs", "1", "--max-train-images", "128", "--no-progress"]
    assert main([*args, "--name", "mine", "--store", str(store), "--run-dir", str(tmp_path / "run")]) == 0
    bundle = load_bundle(store / "mine" / "1", require_weights=True)
    assert bundle.manifest.architecture == "usernet:make"
    model = load_bundle_model(bundle)
    import onnxruntime as ort

    x = bundle.pool_images[:8].astype(np.float32) / np.float32(255.0)
    sess = ort.InferenceSession(bundle.model_bytes, providers=["CPUExecutionProvider"])
    want = sess.run(None, {bundle.manifest.input.name: x})[0]
    with torch.no_grad():
        got = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_user_factory_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"importable PACKAGE\.MODULE:FACTORY"):
        build_model("usernet:missing", 10, 1)
    with pytest.raises(ValueError, match=r"return a torch.nn.Module"):
        build_model("usernet:not_a_module", 10, 1)
    with pytest.raises(ValueError, match="unknown architecture"):
        build_model("nonsense", 10, 1)


def test_arch_flag_refuses_what_is_neither_builtin_nor_a_factory_path(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bundle", "--arch", "not a path"])
    assert exc.value.code == 2
    assert "PACKAGE.MODULE:FACTORY" in capsys.readouterr().err

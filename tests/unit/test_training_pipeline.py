"""The artifact pipeline on a tiny run: train -> export -> pool -> calibrate -> manifest -> loader -> engine."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from service.errors import BundleError  # noqa: E402
from service.manifest import MANIFEST_FILE, MODEL_FILE  # noqa: E402
from service.mi.engine import MIEngine  # noqa: E402
from service.mi.params import Mode  # noqa: E402
from service.store import load_bundle, open_backend, sha256_file  # noqa: E402
from service.training.bundle import BundleRequest, build_bundle, default_train_config, recompute_numbers  # noqa: E402
from service.training.calibrate import choose_threshold  # noqa: E402
from service.training.datasets import load_dataset  # noqa: E402
from service.training.export import ExportError, export_bundle_model  # noqa: E402
from service.training.models import build_model, load_bundle_model  # noqa: E402
from service.training.train import Training  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """One intra-op thread: several times faster than two on a small CPU shared with other test runs."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory):
    """One epoch on 256 training images of mnist5k, built through the real pipeline into a tmp store."""
    store = tmp_path_factory.mktemp("store")
    cfg = default_train_config("mnist5k", Training.MIXUP, epochs=1, seed=3)
    req = BundleRequest(store=store, config=cfg, seed=3, max_train_images=256, progress=False, command="pytest")
    return build_bundle(req)


def test_tiny_run_gives_a_bundle_the_loader_accepts_and_the_engine_serves(tiny_bundle):
    bundle = load_bundle(tiny_bundle, require_weights=True)
    m = bundle.manifest
    assert (m.name, m.version, m.architecture) == ("mnist-mixup", "1", "mnist_cnn")
    assert m.splits.model_dump() == {"train": 3500, "pool": 1000, "calibration": 500, "test": 1000}
    assert m.mi.threshold_rule == "target_fpr=0.05" and m.calibration.false_flag_rate <= 0.05
    assert m.recipe.training["max_train_images"] == 256 and m.recipe.seed == 3
    assert m.input.shape == (1, 28, 28) and m.class_names == tuple("0123456789")
    ds = load_dataset("mnist5k")
    assert m.dataset.sha256 == ds.sha256
    assert np.array_equal(bundle.pool_images, ds.images[bundle.splits["pool"]])
    backend = open_backend(bundle, intra_op_threads=1)
    engine = MIEngine(backend, bundle.pool_labels, m.mi, seed=0)
    x = ds.images[bundle.splits["test"][:16]].astype(np.float32) / 255
    res = engine(x, Mode.COMBINED)
    assert res.label.shape == (16,) and np.allclose(res.probs.sum(axis=1), 1.0, atol=1e-5)


@pytest.mark.slow
def test_recorded_numbers_are_recomputed_exactly(tiny_bundle):
    m = load_bundle(tiny_bundle).manifest
    again = recompute_numbers(tiny_bundle)
    assert again["accuracy"] == m.accuracy.model_dump()
    assert again["threshold"] == m.mi.threshold
    assert again["calibration"] == m.calibration.model_dump()


def test_torch_twin_rebuilt_from_weights_matches_the_onnx_model(tiny_bundle):
    bundle = load_bundle(tiny_bundle, require_weights=True)
    model = load_bundle_model(bundle)
    assert not model.training
    x = np.random.default_rng(0).random((64, 1, 28, 28), dtype=np.float32)
    ort_logits = open_backend(bundle, intra_op_threads=1).logits(x)
    with torch.no_grad():
        torch_logits = model(torch.from_numpy(x)).numpy()
    assert np.max(np.abs(ort_logits - torch_logits)) <= 1e-4


def _copy_bundle(src: Path, root: Path) -> Path:
    dst = root / "mnist-mixup" / "1"
    shutil.copytree(src, dst)
    return dst


def test_corrupted_onnx_is_refused_by_the_loader(tiny_bundle, tmp_path):
    dst = _copy_bundle(tiny_bundle, tmp_path)
    blob = bytearray((dst / MODEL_FILE).read_bytes())
    blob[10:200] = b"\xff" * 190
    (dst / MODEL_FILE).write_bytes(bytes(blob))
    with pytest.raises(BundleError, match=r"sha256 mismatch for model\.onnx"):
        load_bundle(dst)
    # even with a manifest whose hash matches the corrupt file, the loader refuses to parse it
    manifest = json.loads((dst / MANIFEST_FILE).read_text())
    manifest["files"][MODEL_FILE] = sha256_file(dst / MODEL_FILE)
    (dst / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="corrupt"):
        load_bundle(dst)


def test_export_is_checker_clean_dynamic_and_in_parity(tmp_path):
    import onnx

    model = build_model("mnist_cnn", 10, 1).eval()
    report = export_bundle_model(model, tmp_path, (1, 28, 28), n_random=300)
    assert report.max_abs_diff <= 1e-4 and report.n_parity == 302 and report.opset >= 17
    proto = onnx.load(str(tmp_path / MODEL_FILE))
    onnx.checker.check_model(proto, full_check=True)
    dim0 = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert dim0.dim_param and not dim0.HasField("dim_value")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "weights.safetensors"]


class _TracesDifferently(torch.nn.Module):
    """Adds 1 to the logits only for batches larger than the export's dummy batch: the trace misses it."""

    def __init__(self):
        super().__init__()
        self.inner = build_model("mnist_cnn", 10, 1).eval()

    def forward(self, x):
        out = self.inner(x)
        if x.shape[0] > 2:
            out = out + 1.0
        return out


def test_export_aborts_and_leaves_nothing_when_parity_fails(tmp_path):
    with pytest.warns(torch.jit.TracerWarning), pytest.raises(ExportError, match=r"max \|delta logit\|"):
        export_bundle_model(_TracesDifferently().eval(), tmp_path, (1, 28, 28), n_random=50)
    assert list(tmp_path.iterdir()) == []


def test_threshold_for_target_fpr_is_the_smallest_that_meets_it():
    gaps = np.random.default_rng(0).normal(0.05, 0.03, 500).astype(np.float32)
    tau = choose_threshold(gaps, 0.05)
    assert np.mean(gaps >= np.float32(tau)) <= 0.05
    assert np.mean(gaps >= np.float32(tau - 1e-4)) > 0.05 or tau == 0.0
    assert choose_threshold(np.full(10, -0.2, np.float32), 0.05) == 0.0


def test_cli_registration_does_not_import_torch_and_documents_every_option():
    code = (
        "import sys; from service.cli import build_parser; p = build_parser(); "
        "assert 'torch' not in sys.modules, 'torch imported at registration'; "
        "sub = next(a for a in p._actions if a.dest == 'command'); "
        "names = ['train', 'export', 'pool', 'calibrate', 'bundle']; "
        "missing = [(n, a.dest) for n in names for a in sub.choices[n]._actions if not a.help]; "
        "assert not missing, missing; print('ok')"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


@pytest.mark.slow
def test_step_by_step_cli_builds_the_same_kind_of_bundle_and_recalibrates_it(tmp_path, capsys):
    from service.cli import main

    run, bundle = tmp_path / "run", tmp_path / "store" / "steps" / "2"
    common = ["--seed", "5", "--epochs", "1", "--max-train-images", "128", "--run-dir", str(run), "--no-progress"]
    assert main(["train", *common]) == 0
    assert (run / "final.safetensors").is_file() and (run / "epoch-0001.safetensors").is_file()
    assert main(["pool", "--seed", "5", "--out", str(bundle)]) == 0
    assert main(["export", "--run-dir", str(run), "--out", str(bundle)]) == 0
    assert main(["calibrate", "--bundle", str(bundle), "--run-dir", str(run), "--target-fpr", "0.1"]) == 0
    m = load_bundle(bundle, require_weights=True).manifest
    assert (m.name, m.version, m.mi.threshold_rule, m.recipe.seed) == ("steps", "2", "target_fpr=0.1", 5)
    assert m.calibration.false_flag_rate <= 0.1
    assert "mixinfer" in m.recipe.command and m.recipe.training["max_train_images"] == 128
    capsys.readouterr()
    assert main(["calibrate", "--bundle", str(bundle), "--threshold", "0.2"]) == 0
    out = json.loads(capsys.readouterr().out)
    again = load_bundle(bundle, require_weights=True).manifest
    assert again.mi.threshold == 0.2 and again.mi.threshold_rule == "fixed=0.2" and out["threshold"] == 0.2
    assert again.accuracy.plain == m.accuracy.plain and again.files == m.files


def test_cifar_format_data_goes_through_the_same_pipeline(tmp_path):
    from test_training_datasets import _fake_cifar10

    md5 = _fake_cifar10(tmp_path / "c10", per_batch=24, seed=1)
    cfg = default_train_config("cifar10", Training.MIXUP, "mnist_cnn", epochs=1, seed=0)
    req = BundleRequest(
        dataset="cifar10",
        name="c10",
        store=tmp_path / "store",
        data_dir=tmp_path / "c10",
        checksums=md5,
        config=cfg,
        progress=False,
        threshold=0.2,
    )
    bundle = load_bundle(build_bundle(req), require_weights=True)
    m = bundle.manifest
    assert m.class_names[:2] == ("class0", "class1") and m.input.shape == (3, 32, 32)
    assert np.array_equal(bundle.splits["test"], np.arange(120, 144))  # the official test batch, as is
    assert m.mi.threshold == 0.2 and m.mi.threshold_rule == "fixed=0.2"
    assert m.recipe.training["augment"] == "flip-crop" and m.recipe.training["pad"] == 4

"""``mixinfer import``: models built here that differ from the project's convention in every option, imported
into bundles (adapters inside the served graph, parity with the original, seeded splits, calibration), and every
refusal (exit code 2, one line: what, expected, got)."""

from __future__ import annotations

import hashlib
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from importmodels import (
    CLASSES,
    SIZE,
    VARIANTS,
    Variant,
    build_grey_model,
    build_model,
    class_images,
    import_args,
    import_variant,
    reference_probs,
    save,
    write_folder,
    write_grey_folder,
)
from onnx import TensorProto, helper

from service.cli import main
from service.importing.options import TRAINING_DATA_UNKNOWN
from service.store import load_bundle

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_folder(tmp_path_factory.mktemp("import-data") / "images")


@pytest.fixture
def plain(tmp_path) -> Path:
    return save(build_model(Variant("plain")), tmp_path / "plain.onnx")


def refused(capsys, args: list[str]) -> str:
    """Run ``mixinfer`` in-process; assert exit code 2 and one stderr line naming expected and got; return it."""
    capsys.readouterr()
    assert main(args) == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("mixinfer import: refused")]
    assert len(lines) == 1, lines
    assert "expected" in lines[0] and "got" in lines[0], lines[0]
    return lines[0]


def served_probs(bundle_dir: Path, images_u8: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(bundle_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    z = sess.run(None, {sess.get_inputs()[0].name: images_u8.astype(np.float32) / np.float32(255.0)})[0]
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.name)
def test_every_convention_imports_with_parity(variant, data, tmp_path):
    bundle_dir = import_variant(variant, tmp_path, data, tmp_path / "store")
    bundle = load_bundle(bundle_dir, require_weights=True)
    m = bundle.manifest
    imp = m.imported
    assert imp is not None
    assert (imp.input_layout, imp.pixel_range, imp.input_type, imp.output) == (
        variant.layout,
        variant.pixel_range,
        variant.input_type,
        variant.output,
    )
    assert imp.batch == ("dynamic" if variant.batch == 1 else "symbolic")
    assert imp.source_sha256 == hashlib.sha256((tmp_path / f"{variant.name}.onnx").read_bytes()).hexdigest()
    assert imp.parity.max_dp_batch1 <= imp.parity.tol and imp.parity.max_dp_batched <= imp.parity.tol
    assert imp.parity.batch > 1
    assert imp.training_data == TRAINING_DATA_UNKNOWN
    assert m.input.shape == (3, SIZE, SIZE) and m.class_names == CLASSES
    assert imp.twin.converted and imp.twin.max_dp is not None and imp.twin.zero_gradient_images == 0
    assert not np.intersect1d(bundle.splits["pool"], bundle.splits["test"]).size
    assert m.accuracy.plain >= 0.9 and m.accuracy.mi_pl is not None and m.accuracy.mi_ol is not None
    # the served graph (NCHW float32 in [0, 1]) against the original fed as its user would, on fresh images
    rng = np.random.default_rng(7)
    fresh = np.concatenate([class_images(k, 4, rng) for k in range(3)])
    got = served_probs(bundle_dir, fresh)
    want = reference_probs(variant, tmp_path / f"{variant.name}.onnx", fresh)
    assert np.max(np.abs(got - want)) <= imp.parity.tol
    assert (got.argmax(1) == np.repeat(np.arange(3), 4)).all()


def test_the_manifest_records_the_command_that_ran_not_the_process_arguments(data, tmp_path, monkeypatch):
    """main(argv) called by a program (a test, a notebook) records argv, not the calling process's sys.argv."""
    variant = VARIANTS[0]
    path = save(build_model(variant), tmp_path / "model.onnx")
    argv = import_args(path, data, tmp_path / "store", "plain", *variant.cli_flags())
    monkeypatch.setattr(sys, "argv", ["pytest", "-q", "tests"])
    assert main(argv) == 0
    manifest = load_bundle(tmp_path / "store" / "plain" / "1").manifest
    assert manifest.recipe.command == "mixinfer " + shlex.join(argv)


def test_fixed_batch_with_hardcoded_reshape_runs_in_a_scan(data, tmp_path, caplog):
    v = Variant("hard-reshape", batch=1)
    with caplog.at_level("INFO"):
        bundle_dir = import_variant(v, tmp_path, data, tmp_path / "store", hardcoded_reshape=True)
    imp = load_bundle(bundle_dir).manifest.imported
    assert imp is not None and imp.batch == "scan"
    assert "inside an ONNX Scan" in caplog.text
    assert not imp.twin.converted and "Scan" in (imp.twin.reason or "")
    rng = np.random.default_rng(3)
    fresh = np.concatenate([class_images(k, 5, rng) for k in range(3)])  # 15 images in one call
    assert (
        np.max(np.abs(served_probs(bundle_dir, fresh) - reference_probs(v, tmp_path / "hard-reshape.onnx", fresh)))
        < 1e-5
    )


def test_uint8_twin_passes_gradients_straight_through(data, tmp_path):
    import torch

    from service.importing.twin import convert_served

    bundle_dir = import_variant(Variant("u8", input_type="uint8", pixel_range="0-255"), tmp_path, data, tmp_path / "s")
    served = (bundle_dir / "model.onnx").read_bytes()
    assert {"Round", "Clip", "Cast"} <= {n.op_type for n in onnx.load_model_from_string(served).graph.node}
    twin = convert_served(served)
    x = torch.full((2, 3, SIZE, SIZE), 0.5, requires_grad=True)
    twin(x)[:, 0].sum().backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0


def test_mi_cost_above_three_points_is_warned(data, tmp_path, caplog):
    with caplog.at_level("WARNING"):
        bundle_dir = import_variant(Variant("warned"), tmp_path, data, tmp_path / "store")
    acc = load_bundle(bundle_dir).manifest.accuracy
    assert acc.plain - acc.mi_combined > 0.03  # the synthetic model is not mixup-trained: MI pays
    assert "MI-Combined costs" in caplog.text and "points of clean accuracy" in caplog.text


def test_auxiliary_output_needs_output_name(capsys, data, tmp_path):
    path = save(build_model(Variant("two-out"), extra_output=True), tmp_path / "two.onnx")
    line = refused(capsys, import_args(path, data, tmp_path / "store", "two"))
    assert "--output-name" in line
    assert main(import_args(path, data, tmp_path / "store", "two", "--output-name", "scores")) == 0
    assert load_bundle(tmp_path / "store" / "two" / "1").manifest.imported.source_output == "scores"


def _two_inputs(tmp_path: Path, default: bool) -> Path:
    model = build_model(Variant("aux"))
    g = model.graph
    g.input.append(helper.make_tensor_value_info("aux", TensorProto.FLOAT, ["N", 3, SIZE, SIZE]))
    if default:
        g.initializer.append(onnx.numpy_helper.from_array(np.zeros((1, 3, SIZE, SIZE), np.float32), "aux"))
    g.node.append(helper.make_node("Identity", ["aux"], ["aux_out"]))
    return save(model, tmp_path / f"aux-{default}.onnx")


def test_ambiguous_image_inputs_are_refused(capsys, data, tmp_path):
    path = _two_inputs(tmp_path, default=False)
    assert "--input-name" in refused(capsys, import_args(path, data, tmp_path / "s", "aux"))
    line = refused(capsys, import_args(path, data, tmp_path / "s", "aux", "--input-name", "input"))
    assert "without defaults" in line


def test_auxiliary_input_with_a_default_is_fine(data, tmp_path):
    path = _two_inputs(tmp_path, default=True)
    assert main(import_args(path, data, tmp_path / "s", "aux")) == 0


def test_non_image_input_rank_is_refused(capsys, data, tmp_path):
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "flat",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    line = refused(capsys, import_args(save(model, tmp_path / "flat.onnx"), data, tmp_path / "s", "flat"))
    assert "rank 4" in line and "got rank 2" in line


def test_class_count_mismatch_is_refused(capsys, plain, tmp_path):
    four = write_folder(tmp_path / "four", n_per_class=6, classes=(*CLASSES, "d_extra"))
    line = refused(capsys, import_args(plain, four, tmp_path / "s", "four"))
    assert "expected 3 (the model's outputs), got 4" in line


def test_class_with_too_few_images_is_refused(capsys, plain, tmp_path):
    few = write_folder(tmp_path / "few", n_per_class=2)
    assert "expected >= 3 images" in refused(capsys, import_args(plain, few, tmp_path / "s", "few"))


def test_external_data_is_refused(capsys, data, tmp_path):
    model = build_model(Variant("ext"))
    onnx.save_model(model, str(tmp_path / "ext.onnx"), save_as_external_data=True, size_threshold=0, location="w.bin")
    assert "external-data" in refused(capsys, import_args(tmp_path / "ext.onnx", data, tmp_path / "s", "ext"))


def test_opset_the_runtime_cannot_run_is_refused(capsys, data, tmp_path):
    model = build_model(Variant("future"))
    model.opset_import[0].version = 99
    path = tmp_path / "future.onnx"
    path.write_bytes(model.SerializeToString())
    assert "got opset 99" in refused(capsys, import_args(path, data, tmp_path / "s", "future"))


def test_graph_failing_the_checker_is_refused(capsys, data, tmp_path):
    model = build_model(Variant("broken"))
    model.graph.node.append(helper.make_node("Relu", ["no_such_tensor"], ["dangling"]))
    path = tmp_path / "broken.onnx"
    path.write_bytes(model.SerializeToString())
    assert "onnx.checker" in refused(capsys, import_args(path, data, tmp_path / "s", "broken"))


def test_symbolic_size_needs_input_size(capsys, data, tmp_path):
    path = save(build_model(Variant("sym", symbolic_size=True)), tmp_path / "sym.onnx")
    assert "--input-size" in refused(capsys, import_args(path, data, tmp_path / "s", "sym"))


def test_parity_above_tolerance_is_refused(capsys, data, tmp_path):
    path = save(build_model(Variant("sm", output="probabilities")), tmp_path / "sm.onnx")
    line = refused(capsys, import_args(path, data, tmp_path / "s", "sm", "--output", "logits"))
    assert "ends in softmax" in line  # never softmaxed twice
    logits = save(build_model(Variant("lg")), tmp_path / "lg.onnx")
    assert "summing to 1" in refused(
        capsys, import_args(logits, data, tmp_path / "s", "lg", "--output", "probabilities")
    )
    line = refused(
        capsys, import_args(path, data, tmp_path / "s", "sm", "--output", "probabilities", "--parity-tol", "1e-12")
    )
    assert "parity" in line and "max |dp| <= 1e-12" in line


CLASSES_SWAPPED = ("a_blue", "b_green", "z_red")  # the folders' sorted order


def test_folder_order_not_the_models_is_refused_then_fixed_by_class_names(capsys, plain, tmp_path):
    # folders sorted as blue, green, red while the model's outputs are red, green, blue
    swapped = write_folder(tmp_path / "swapped", classes=("z_red", "b_green", "a_blue"))
    line = refused(capsys, import_args(plain, swapped, tmp_path / "s", "swapped"))
    assert "near" not in line and "chance" in line and "--class-names" in line
    names = tmp_path / "names.txt"
    names.write_text("z_red\nb_green\na_blue\n")
    assert main(import_args(plain, swapped, tmp_path / "s", "swapped", "--class-names", str(names))) == 0
    m = load_bundle(tmp_path / "s" / "swapped" / "1").manifest
    assert m.class_names == ("z_red", "b_green", "a_blue") and m.accuracy.plain >= 0.9
    assert m.imported.class_names_from == "file"
    from service.robustness.data import load_split

    _, y, idx = load_split(load_bundle(tmp_path / "s" / "swapped" / "1"), "test", None, swapped)
    assert (y == np.asarray([("z_red", "b_green", "a_blue").index(CLASSES_SWAPPED[i // 24]) for i in idx])).all()


def test_test_dir_is_the_test_split(plain, data, tmp_path):
    held = write_folder(tmp_path / "held", n_per_class=5, seed=11)
    store = tmp_path / "s"
    assert main(import_args(plain, data, store, "held", "--test-dir", str(held))) == 0
    bundle = load_bundle(store / "held" / "1")
    m = bundle.manifest
    n_data = 3 * 24
    assert sorted(bundle.splits["test"].tolist()) == list(range(n_data, n_data + 15))
    assert m.imported.test_dir == str(held.resolve()) and "--test-dir" in m.imported.training_data
    from service.robustness.data import load_split

    x, y, _ = load_split(bundle, "test", None, data)
    assert x.shape == (15, 3, SIZE, SIZE) and (np.bincount(y) == 5).all()
    # re-calibration finds the same assembled dataset (data-dir + test-dir, hash checked)
    assert (
        main(["calibrate", "--bundle", str(store / "held" / "1"), "--data-dir", str(data), "--threshold", "0.2"]) == 0
    )
    assert load_bundle(store / "held" / "1").manifest.mi.threshold == 0.2


def test_existing_bundle_needs_force(capsys, plain, data, tmp_path):
    assert main(import_args(plain, data, tmp_path / "s", "twice")) == 0
    assert "--force" in refused(capsys, import_args(plain, data, tmp_path / "s", "twice"))
    assert main(import_args(plain, data, tmp_path / "s", "twice", "--force")) == 0


def test_refusal_from_the_command_line_is_one_line_exit_2(data, tmp_path):
    path = save(build_model(Variant("sym", symbolic_size=True)), tmp_path / "sym.onnx")
    proc = subprocess.run(
        [sys.executable, "-m", "service.cli", *import_args(path, data, tmp_path / "s", "sym")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("mixinfer import: refused: input 'input'")


def test_one_channel_nhwc_model_imports(tmp_path):
    grey = write_grey_folder(tmp_path / "grey")
    path = save(build_grey_model(), tmp_path / "grey.onnx")
    flags = ["--input-layout", "nhwc", "--pixel-range", "0-255"]
    assert main(import_args(path, grey, tmp_path / "s", "grey", *flags)) == 0
    m = load_bundle(tmp_path / "s" / "grey" / "1").manifest
    assert m.input.shape == (1, SIZE, SIZE) and m.accuracy.plain >= 0.9


def test_old_opset_is_converted_for_the_adapters(data, tmp_path):
    path = save(build_model(Variant("old"), opset=11), tmp_path / "old.onnx")
    assert main(import_args(path, data, tmp_path / "s", "old")) == 0
    imp = load_bundle(tmp_path / "s" / "old" / "1").manifest.imported
    assert imp.opset == 13 and imp.parity.max_dp_batched <= imp.parity.tol


def test_symbolic_batch_with_a_hardcoded_reshape_falls_back_to_scan(data, tmp_path):
    path = save(build_model(Variant("sym-hard"), hardcoded_reshape=True), tmp_path / "sym-hard.onnx")
    assert main(import_args(path, data, tmp_path / "s", "symhard")) == 0
    assert load_bundle(tmp_path / "s" / "symhard" / "1").manifest.imported.batch == "scan"


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--input-size", "4x4"], "expected the graph's fixed 8x8, got 4x4"),
        (["--input-size", "eight"], "expected HxW"),
        (["--mean", "0.5,0.5"], "expected both or neither"),
        (["--mean", "0.5,0.5", "--std", "0.2,0.2"], "expected 1 or 3 values"),
        (["--mean", "0.5", "--std", "0"], "expected non-zero values"),
        (["--mean", "nan", "--std", "1"], "expected finite numbers"),
        (["--mean", "0.5", "--std", "inf"], "expected finite numbers"),
        (["--input-layout", "nhwc"], "expected 1 or 3 channels, got 8"),
    ],
)
def test_options_that_contradict_the_graph_are_refused(capsys, plain, data, tmp_path, flags, needle):
    assert needle in refused(capsys, import_args(plain, data, tmp_path / "s", "opts", *flags))


def test_uint8_input_with_normalisation_is_refused(capsys, data, tmp_path):
    path = save(build_model(Variant("u8", input_type="uint8", pixel_range="0-255")), tmp_path / "u8.onnx")
    line = refused(capsys, import_args(path, data, tmp_path / "s", "u8", "--pixel-range", "0-1"))
    assert "a uint8 input holds 0-255 pixels" in line


def test_unreadable_image_in_the_folder_is_refused_in_one_line(capsys, plain, tmp_path):
    folder = write_folder(tmp_path / "imgs", n_per_class=6)
    (folder / CLASSES[0] / "._000.png").write_bytes(b"\x00\x05\x16\x07" + bytes(60))  # skipped: hidden
    (folder / CLASSES[1] / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    line = refused(capsys, import_args(plain, folder, tmp_path / "s", "broken"))
    assert "broken.png" in line and "._000.png" not in line


def test_nan_at_a_batch_above_1_is_no_parity(data, tmp_path):
    """A graph that is right at batch 1 but returns NaN at batch 8 (here: + log(2 - batch)) must not pass parity
    as it is (max(1e-9, nan) is 1e-9 in Python): it falls back to the Scan over the batch, finite at any batch."""
    model = build_model(Variant("nan-batched"))
    g = model.graph
    g.initializer.extend([onnx.numpy_helper.from_array(np.asarray([0], np.int64), "zero"),
                          onnx.numpy_helper.from_array(np.asarray([2.0], np.float32), "two")])  # fmt: skip
    g.node.extend([
        helper.make_node("Shape", ["input"], ["in_shape"]),
        helper.make_node("Gather", ["in_shape", "zero"], ["n"], axis=0),
        helper.make_node("Cast", ["n"], ["nf"], to=TensorProto.FLOAT),
        helper.make_node("Sub", ["two", "nf"], ["left"]),
        helper.make_node("Log", ["left"], ["shift"]),
        helper.make_node("Add", ["scores", "shift"], ["shifted"]),
    ])  # fmt: skip
    g.output[0].name = "shifted"
    path = save(model, tmp_path / "nan.onnx")
    assert main(import_args(path, data, tmp_path / "s", "nanb")) == 0
    bundle_dir = tmp_path / "s" / "nanb" / "1"
    assert load_bundle(bundle_dir).manifest.imported.batch == "scan"
    images = class_images(0, 8, np.random.default_rng(5))
    assert np.isfinite(served_probs(bundle_dir, images)).all()


def test_model_whose_tensors_are_named_images_and_logits_imports(data, tmp_path):
    """The most common export names are the server's own: the served graph renames its ends (mixinfer_images,
    mixinfer_logits) and calibration, accuracies and recomputation must use the manifest's names."""
    from service.training.bundle import recompute_numbers

    v = Variant("named-like-ours")
    model = build_model(v)
    rename = {"input": "images", "scores": "logits"}
    for node in model.graph.node:
        node.input[:] = [rename.get(n, n) for n in node.input]
        node.output[:] = [rename.get(n, n) for n in node.output]
    model.graph.input[0].name, model.graph.output[0].name = "images", "logits"
    path = save(model, tmp_path / "ours.onnx")
    assert main(import_args(path, data, tmp_path / "s", "ours")) == 0
    bundle_dir = tmp_path / "s" / "ours" / "1"
    m = load_bundle(bundle_dir).manifest
    assert (m.input.name, m.input.output_name) == ("mixinfer_images", "mixinfer_logits")
    images = class_images(1, 4, np.random.default_rng(3))
    np.testing.assert_allclose(served_probs(bundle_dir, images), reference_probs(v, path, images), atol=1e-5)
    assert recompute_numbers(bundle_dir, data)["accuracy"] == m.accuracy.model_dump()


def test_fixed_batch_above_1_is_refused_in_one_line(capsys, data, tmp_path):
    path = save(build_model(Variant("batch4", batch=4)), tmp_path / "b4.onnx")
    line = refused(capsys, import_args(path, data, tmp_path / "s", "b4"))
    assert "expected a symbolic batch axis or a fixed batch of 1, got a fixed batch of 4" in line


def test_class_names_file_with_a_bom_and_crlf_reads_as_written(data, tmp_path):
    """Windows Notepad writes UTF-8 with a byte-order mark and CRLF line ends."""
    names = tmp_path / "names.txt"
    names.write_bytes(("\ufeff" + "\r\n".join(CLASSES) + "\r\n").encode("utf-8"))
    path = save(build_model(Variant("bom")), tmp_path / "bom.onnx")
    assert main(import_args(path, data, tmp_path / "s", "bom", "--class-names", str(names))) == 0
    assert tuple(load_bundle(tmp_path / "s" / "bom" / "1").manifest.class_names) == CLASSES


def test_greyscale_model_imports_images_saved_as_rgb(tmp_path):
    """Greyscale pictures are often saved as RGB files; the server reads them for a 1-channel model (luma), so the
    import must too, and the evaluation must reload the same dataset (same sha256)."""
    from PIL import Image

    from service.training.datasets import load_manifest_dataset

    grey = write_grey_folder(tmp_path / "grey")
    for f in grey.rglob("*.png"):
        Image.open(f).convert("RGB").save(f)
    path = save(build_grey_model(), tmp_path / "grey.onnx")
    flags = ["--input-layout", "nhwc", "--pixel-range", "0-255"]
    assert main(import_args(path, grey, tmp_path / "s", "grey", *flags)) == 0
    m = load_bundle(tmp_path / "s" / "grey" / "1").manifest
    assert m.input.shape == (1, SIZE, SIZE) and m.accuracy.plain >= 0.9
    assert load_manifest_dataset(m, grey).sha256 == m.dataset.sha256


def test_test_dir_holding_the_data_dirs_images_is_refused(capsys, plain, data, tmp_path):
    """--test-dir is the user's word that the model never saw those images; the very images of --data-dir (whose
    pool the server mixes with) contradict it: refused, naming a duplicate."""
    line = refused(capsys, import_args(plain, data, tmp_path / "s", "same", "--test-dir", str(data)))
    assert "pixel-identical to --data-dir images" in line and ".png" in line
    copy = write_folder(tmp_path / "copy", n_per_class=5, seed=11)
    shutil.copy(data / CLASSES[0] / "003.png", copy / CLASSES[0] / "dup.png")
    line = refused(capsys, import_args(plain, data, tmp_path / "s", "one", "--test-dir", str(copy)))
    assert "got 1 of 16" in line and "dup.png" in line


@pytest.mark.parametrize("shape", [["N", 1, 3], ["N", 3, 1, 1]], ids=["B-1-K", "B-K-1-1"])
def test_scores_with_unit_axes_are_flattened(data, tmp_path, shape):
    """(B, 1, K) and (B, K, 1, 1) (a classifier ending in a 1x1 convolution) are class scores too."""
    v = Variant("unit-axes")
    model = build_model(v)
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.asarray(shape[1:], np.int64), "unit_shape"))
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.asarray([-1, *shape[1:]], np.int64), "full"))
    model.graph.node.append(helper.make_node("Reshape", ["scores", "full"], ["scores_nd"]))
    del model.graph.output[:]
    model.graph.output.append(helper.make_tensor_value_info("scores_nd", TensorProto.FLOAT, shape))
    path = save(model, tmp_path / "nd.onnx")
    assert main(import_args(path, data, tmp_path / "s", "nd")) == 0
    bundle_dir = tmp_path / "s" / "nd" / "1"
    assert load_bundle(bundle_dir).manifest.n_classes == 3
    images = class_images(2, 5, np.random.default_rng(4))
    flat = save(build_model(v), tmp_path / "flat.onnx")  # the same model with (B, K) scores
    np.testing.assert_allclose(served_probs(bundle_dir, images), reference_probs(v, flat, images), atol=1e-5)

"""`mixinfer evaluate --budget quick` on imported bundles: with the onnx2torch twin (white-box and black-box rows)
and, where the served graph cannot be converted, the black-box attacks only, said in the report."""

from __future__ import annotations

import json

import pytest
from importmodels import Variant, import_variant, write_folder

from service.cli import main


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp("import-eval") / "images")


def evaluate(bundle_dir, data, out) -> dict:
    args = ["evaluate", "--bundle", str(bundle_dir), "--budget", "quick", "--n-images", "6", "--seeds", "1", "2", "3"]
    assert main([*args, "--data-dir", str(data), "--out", str(out), "--no-progress", "--device", "cpu"]) == 0
    return json.loads((out / "results.json").read_text())


def test_imported_nhwc_model_evaluates_end_to_end_with_its_twin(data, tmp_path):
    v = Variant("nhwc-norm", layout="nhwc", normalised_outside=True)
    res = evaluate(import_variant(v, tmp_path, data, tmp_path / "store"), data, tmp_path / "report")
    groups = {r["group"] for r in res["attacks"]}
    assert {"oblivious", "adaptive", "black-box"} <= groups
    assert res["blackbox_only"] is None
    assert res["bundle"]["imported"]["input_layout"] == "nhwc"
    md = (tmp_path / "report" / "report.md").read_text()
    assert "training data unknown; the user asserts that the test images are held out" in md


def test_unconvertible_graph_evaluates_black_box_only_and_says_so(data, tmp_path):
    v = Variant("scan", batch=1)
    bundle_dir = import_variant(v, tmp_path, data, tmp_path / "store", hardcoded_reshape=True)
    res = evaluate(bundle_dir, data, tmp_path / "report")
    assert {r["group"] for r in res["attacks"]} == {"black-box"}  # Square at both response-detail levels
    assert res["blackbox_only"].startswith("black-box attacks only") and "Scan" in res["blackbox_only"]
    assert res["blackbox_only"] in res["warnings"]
    assert "black-box attacks only" in (tmp_path / "report" / "report.md").read_text()

"""`mixinfer evaluate --budget quick` and `mixinfer calibrate --sweep` run end to end and write well-formed output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from service.cli import main
from service.robustness.report import PLOTS
from service.robustness.sweep import pick_lambda

DEFENCES = ("off", "pl", "ol", "combined")


def _check_stats(stats: dict, n_seeds: int) -> None:
    tol = 1e-9
    assert 0.0 <= stats["min"] <= stats["mean"] + tol and stats["mean"] <= stats["max"] + tol and stats["max"] <= 1.0
    assert len(stats["per_seed"]) == n_seeds
    if stats["worst"] is not None:
        assert stats["worst"] <= stats["min"] + 1e-9


@pytest.mark.slow
def test_evaluate_quick_runs_end_to_end_and_writes_a_well_formed_report(mnist_bundle_dir: Path, tmp_path: Path, capsys):
    out = tmp_path / "report"
    rc = main(
        [
            "evaluate",
            "--bundle",
            str(mnist_bundle_dir),
            "--budget",
            "quick",
            "--out",
            str(out),
            "--no-progress",
            "--threads",
            "1",
            "--device",
            "cpu",
            "--seeds",
            "1",
            "2",
            "3",
        ]
    )
    assert rc == 0
    assert "per-image worst case" in capsys.readouterr().out
    res = json.loads((out / "results.json").read_text())
    assert res["budget"]["name"] == "quick" and res["seeds"] == [1, 2, 3]
    assert res["bundle"]["mi"]["n_pl"] == 5  # the served parameters, from the manifest
    env = res["environment"]
    assert env["torch_device"] == "cpu" and env["gpu"] is None and env["scoring"] == "ONNX Runtime CPU provider"
    n = res["budget"]["n_images"]
    assert len(res["test_indices"]) == n and len(res["clean_gap"]) == 3 * n
    groups = {r["group"] for r in res["attacks"]}
    assert groups == {"oblivious", "transfer", "adaptive", "black-box", "cross-check"}
    names = [r["name"].split("@")[0] for r in res["attacks"]]
    for expected in (
        "pgd-pred",
        "pgd-gt",
        "pgd-targeted",
        "transfer",
        "eot-combined",
        "pl-aware",
        "ol-direct",
        "ol-standalone",
        "square",
        "apgd-eot",
    ):
        assert expected in names
    for r in res["attacks"]:
        assert r["max_perturbation"] <= r["eps"] + 1e-6
        for d in DEFENCES:
            _check_stats(r["accuracy"][d], 3)
        if r["group"] == "oblivious":
            assert {"gaussian", "rotation", "crop_pad", "crop_resize"} <= set(r["accuracy"])
        assert 0.0 <= r["gap_auroc"] <= 1.0
        assert set(r["ric"]) == {"pl", "ol", "combined"}
    # the attacks hurt the undefended model: oblivious PGD at the largest eps beats the clean accuracy
    strongest = [r for r in res["attacks"] if r["name"].startswith("pgd-gt")][-1]
    assert strongest["accuracy"]["off"]["mean"] < res["clean"]["accuracy"]["off"]["mean"]
    for d in DEFENCES:
        w = res["worst_case"][d]
        assert 0.0 <= w["all_attacks"] <= w["non_oblivious"] <= 1.0
    md = (out / "report.md").read_text()
    assert "budget `quick`" in md and "## Per-image worst case" in md and "MI-Combined" in md
    assert "twin on cpu, scoring by onnxruntime" in md
    for plot in PLOTS:
        with Image.open(out / plot) as im:
            assert im.format == "PNG" and im.size[0] > 300


def test_evaluate_refuses_a_cuda_device_that_torch_cannot_see(mnist_bundle_dir: Path, tmp_path: Path, caplog):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    rc = main(["evaluate", "--bundle", str(mnist_bundle_dir), "--device", "cuda", "--out", str(tmp_path / "r")])
    assert rc == 2
    assert "torch sees no CUDA device" in caplog.text
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_calibrate_sweep_writes_the_tradeoff_and_picks_by_the_rule(mnist_bundle_dir: Path, tmp_path: Path, capsys):
    out = tmp_path / "sweep"
    rc = main(
        [
            "calibrate",
            "--bundle",
            str(mnist_bundle_dir),
            "--sweep",
            "--sweep-lams",
            "0.5",
            "0.8",
            "--sweep-images",
            "30",
            "--sweep-steps",
            "5",
            "--sweep-seeds",
            "1",
            "2",
            "--sweep-out",
            str(out),
        ]
    )
    assert rc == 0
    res = json.loads((out / "sweep.json").read_text())
    assert [r["lam"] for r in res["pl"]["rows"]] == [0.5, 0.8]
    assert res["pl"]["pick"] in (0.5, 0.8) and res["ol"]["pick"] in (0.5, 0.8)
    assert res["plain"]["adversarial"] < res["plain"]["clean"]
    assert "lam_pl=" in capsys.readouterr().out
    with Image.open(out / "sweep.png") as im:
        assert im.format == "PNG"


def test_pick_rule_prefers_robustness_within_the_clean_budget():
    rows = [
        {"lam": 0.3, "clean": 0.80, "adversarial": 0.70},  # too much clean loss
        {"lam": 0.5, "clean": 0.96, "adversarial": 0.40},
        {"lam": 0.6, "clean": 0.97, "adversarial": 0.40},  # tie on robustness: larger lambda wins
        {"lam": 0.8, "clean": 0.98, "adversarial": 0.10},
    ]
    assert pick_lambda(rows, plain_clean=0.985, max_drop=0.03) == 0.6
    assert pick_lambda(rows[:1], plain_clean=0.985, max_drop=0.03) == 0.3  # none qualifies: the mildest

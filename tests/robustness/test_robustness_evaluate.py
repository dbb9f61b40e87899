"""`mixinfer evaluate --budget quick` and `mixinfer calibrate --sweep` run end to end and write well-formed output."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.stats import binomtest

from service.cli import main
from service.robustness.report import PLOTS
from service.robustness.sweep import pick_lambda

DEFENCES = ("off", "pl", "ol", "combined")


def _check_stats(stats: dict, correct: list[list[int]]) -> None:
    """Recompute every figure of an accuracy cell from the row's per-image, per-seed correctness."""
    c = np.asarray(correct, dtype=bool)
    np.testing.assert_allclose(stats["per_seed"], c.mean(axis=1))
    assert stats["mean"] == pytest.approx(c.mean(axis=1).mean())
    assert stats["worst"] == pytest.approx(c.all(axis=0).mean())
    k, n = int(c.all(axis=0).sum()), c.shape[1]
    lo, hi = binomtest(k, n).proportion_ci(method="exact")
    assert stats["ci"] == [pytest.approx(lo), pytest.approx(hi)]


def _worst_case(rows: list[dict], defence: str, eps: float, groups: tuple[str, ...] | None, key: str) -> float:
    """Independent recomputation: robust = right under every seed of every (selected) attack at eps."""
    robust = None
    for r in rows:
        if r["eps"] != eps or (groups is not None and r["group"] not in groups):
            continue
        table = r["float"]["correct"] if key == "float" and defence in r["float"]["correct"] else r["correct"]
        if defence not in table:
            continue
        ok = np.asarray(table[defence], dtype=bool).all(axis=0)
        robust = ok if robust is None else robust & ok
    assert robust is not None
    return float(robust.mean())


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
            "--cache-dir",
            str(tmp_path / "cache"),  # the default, runs/robustness-cache, outlives the test: a rerun would resume
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
    assert groups == {"oblivious", "transfer", "adaptive", "baseline-eot", "black-box"}
    names = [r["name"].split("@")[0] for r in res["attacks"]]
    assert names == [
        *("pgd-pred", "pgd-gt") * 3,
        "pgd-targeted",
        "transfer",
        "transfer-surrogate",
        *("eot-combined", "pl-aware", "force-flagged", "smooth-switch", "ol-direct", "ol-standalone"),
        "eot-combined-from-transfer",
        *("apgd-eot", "apgd-force-flagged"),
        *("eot-combined-targeted", "pl-aware-targeted", "force-flagged-targeted", "smooth-switch-targeted"),
        *("eot-gaussian", "eot-rotation", "eot-crop_pad", "eot-crop_resize"),
        *("square-full", "square-label"),
    ]
    for r in res["attacks"]:
        assert r["max_perturbation"] <= r["eps"] + 1e-6
        assert r["attack_seed"] == 0 and not r["resumed"]
        for d in DEFENCES:
            _check_stats(r["accuracy"][d], r["correct"][d])
            _check_stats(r["float"]["accuracy"][d], r["float"]["correct"][d])
            assert np.asarray(r["correct"][d]).shape == (3, n)
        if r["group"] in ("oblivious", "baseline-eot"):
            assert {"gaussian", "rotation", "crop_pad", "crop_resize"} <= set(r["accuracy"])
        assert 0.0 <= r["gap_auroc"] <= 1.0
        assert set(r["ric"]) == {"pl", "ol", "combined"}
        if r["group"] in ("adaptive", "baseline-eot"):
            assert len(r["trace"]) >= 4  # a loss curve: start + steps (x restarts)
    # the attacks hurt the undefended model: oblivious PGD at the largest eps beats the clean accuracy
    strongest = [r for r in res["attacks"] if r["name"].startswith("pgd-gt")][-1]
    assert strongest["accuracy"]["off"]["mean"] < res["clean"]["accuracy"]["off"]["mean"]
    eps = res["threat"]["eps"]
    know_mi = ("transfer", "adaptive", "black-box", "cross-check")
    for d in DEFENCES:
        w = res["worst_case"][d]
        assert w["all_attacks"] == pytest.approx(_worst_case(res["attacks"], d, eps, None, "rounded"))
        assert w["all_attacks_float"] == pytest.approx(_worst_case(res["attacks"], d, eps, None, "float"))
        assert w["non_oblivious"] == pytest.approx(_worst_case(res["attacks"], d, eps, know_mi, "rounded"))
    for b in ("gaussian", "rotation", "crop_pad", "crop_resize"):
        w = res["worst_case"][b]
        assert w["non_oblivious"] == pytest.approx(_worst_case(res["attacks"], b, eps, ("baseline-eot",), "rounded"))
    md = (out / "report.md").read_text()
    assert "budget `quick`" in md and "## Per-image worst case" in md and "MI-Combined" in md
    assert "twin on cpu, scoring by onnxruntime" in md
    for plot in PLOTS:
        with Image.open(out / plot) as im:
            assert im.format == "PNG" and im.size[0] > 300


@pytest.mark.slow
def test_a_stopped_evaluation_resumes_from_the_attack_cache(mnist_bundle, tmp_path: Path):
    from service.robustness.budgets import get_budget
    from service.robustness.evaluate import run_evaluation

    budget = get_budget("quick", n_images=6)
    kw = {"seeds": [1, 2, 3], "only": ("pgd-gt", "eot-combined@"), "show_progress": False}
    first = run_evaluation(mnist_bundle, budget, cache_dir=tmp_path / "cache", **kw)
    entries = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert len(entries) == 4 and all(e.endswith(".npz") for e in entries)  # 3 pgd-gt eps + eot-combined
    again = run_evaluation(mnist_bundle, budget, cache_dir=tmp_path / "cache", **kw)
    assert all(r["resumed"] for r in again["attacks"])
    for a, b in zip(first["attacks"], again["attacks"], strict=True):
        assert a["correct"] == b["correct"] and a["trace"] == b["trace"]
        assert b["attack_seconds"] == a["attack_seconds"] is not None  # the time of the run that made the entry
    # the same attack seed without a cache reproduces the attacks; another seed does not reuse the cache
    fresh = run_evaluation(mnist_bundle, budget, cache_dir=None, **kw)
    assert [r["correct"] for r in fresh["attacks"]] == [r["correct"] for r in first["attacks"]]
    other = run_evaluation(mnist_bundle, budget, cache_dir=tmp_path / "cache", attack_seed=5, **kw)
    assert not any(r["resumed"] for r in other["attacks"])


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
    argv = [
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
    rc = main(argv)
    assert rc == 0
    res = json.loads((out / "sweep.json").read_text())
    assert [r["lam"] for r in res["pl"]["rows"]] == [0.5, 0.8]
    for branch in ("pl", "ol", "combined"):
        assert res[branch]["pick"] in (0.5, 0.8), branch
    assert res["plain"]["adversarial"] < res["plain"]["clean"]
    assert "ol_combined.lam=" in capsys.readouterr().out
    with Image.open(out / "sweep.png") as im:
        assert im.format == "PNG"
    # a rerun reproduces every number (the PGD random starts are seeded and recorded)
    (out / "sweep.json").rename(out / "first.json")
    assert main(argv) == 0
    assert json.loads((out / "sweep.json").read_text()) == res and res["pgd_seed"] == 0


def test_pick_rule_prefers_robustness_within_the_clean_budget():
    rows = [
        {"lam": 0.3, "clean": 0.80, "adversarial": 0.70},  # too much clean loss
        {"lam": 0.5, "clean": 0.96, "adversarial": 0.40},
        {"lam": 0.6, "clean": 0.97, "adversarial": 0.40},  # tie on robustness: larger lambda wins
        {"lam": 0.8, "clean": 0.98, "adversarial": 0.10},
    ]
    assert pick_lambda(rows, plain_clean=0.985, max_drop=0.03) == 0.6
    assert pick_lambda(rows[:1], plain_clean=0.985, max_drop=0.03) == 0.3  # none qualifies: the mildest

"""A report folds in the λ sweep and the plateau run beside it, and says why a sweep pick is not served."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from service.robustness import companions
from service.robustness.report import main as rerender

REPO = Path(__file__).resolve().parents[2]


def _sweep(pl_rows: list[tuple[float, float, float]], ol_rows: list[tuple[float, float, float]]) -> dict:
    def rows(spec: list[tuple[float, float, float]]) -> list[dict]:
        return [{"lam": lam, "clean": c, "adversarial": a} for lam, c, a in spec]

    from service.robustness.sweep import pick_lambda

    out = {"eps": 0.1, "steps": 40, "step": 0.01, "n_images": 200, "seeds": [11, 22, 33], "max_clean_drop": 0.03}
    out["plain"] = {"clean": 0.99, "adversarial": 0.0}
    for branch, spec in (("pl", pl_rows), ("ol", ol_rows)):
        out[branch] = {"rows": rows(spec), "pick": pick_lambda(rows(spec), 0.99, 0.03)}
    return out


def _res(lam_pl: float, lam_ol: float, sweep: dict) -> dict:
    mi = {"lam_pl": lam_pl, "ol_standalone": {"lam": lam_ol, "n": 30}, "ol_combined": {"lam": 0.4, "n": 15}}
    return {"bundle": {"mi": mi}, "sweep": sweep}


def _verdicts(res: dict) -> dict[str, str]:
    lines = [ln for ln in companions.lambda_section(res) if ln.startswith("| MI-")]
    return {ln.split(" | ")[0].strip("| "): ln.rsplit(" | ", 1)[1].rstrip(" |") for ln in lines}


def test_lambda_section_names_agreement_a_trade_a_tie_and_a_better_pick():
    # PL: all lambdas equal -> the tie-break picks 0.8; OL: 0.6 gains clean accuracy and loses PGD accuracy
    sweep = _sweep([(0.5, 0.99, 0.0), (0.8, 0.99, 0.0)], [(0.5, 0.94, 0.21), (0.6, 0.99, 0.08)])
    v = _verdicts(_res(0.5, 0.5, sweep))
    assert "no better on either axis" in v["MI-PL"] and "clean +0.0, PGD +0.0" in v["MI-PL"]
    assert "trades one axis" in v["MI-OL"] and "clean +5.0, PGD -13.0" in v["MI-OL"]
    assert set(_verdicts(_res(0.8, 0.6, sweep)).values()) == {"agree"}
    better = _sweep([(0.5, 0.97, 0.0), (0.8, 0.99, 0.05)], [(0.6, 0.99, 0.1)])  # the plain model: 99 % clean, 0 % PGD
    assert "a new bundle version with it is due" in _verdicts(_res(0.5, 0.6, better))["MI-PL"]
    # a robust base model (the IAT case): the mildest λ wins, and no mixing at all is better still
    milder = _sweep([(0.5, 0.99, 0.0)], [(0.6, 0.98, 0.57), (0.8, 0.99, 0.83)])
    milder["plain"] = {"clean": 1.0, "adversarial": 0.835}
    assert "does not pay" in _verdicts(_res(0.5, 0.6, milder))["MI-OL"]
    assert "not on the sweep's grid" in _verdicts(_res(0.45, 0.6, better))["MI-PL"]
    assert "No sweep beside this report" in "\n".join(companions.lambda_section({"bundle": {"mi": {}}}))


@pytest.mark.slow
def test_rerender_folds_in_sweep_and_plateau_files_written_after_the_report(tmp_path: Path):
    out = tmp_path / "mnist-iat"
    shutil.copytree(REPO / "docs/robustness/mnist-iat", out)
    for f in ("plateau.json", "plateau.md", "plateau.png", "sweep"):
        shutil.rmtree(out / f, ignore_errors=True) if f == "sweep" else (out / f).unlink(missing_ok=True)
    res = json.loads((out / "results.json").read_text())
    mi = res["bundle"]["mi"]
    (out / "sweep").mkdir()
    sweep = _sweep([(mi["lam_pl"], 0.99, 0.1)], [(mi["ol_standalone"]["lam"], 0.99, 0.2)])
    (out / "sweep/sweep.json").write_text(json.dumps(sweep))
    plateau = {"n_images": 4, "eps": 0.3, "tolerance": 0.01, "attacks": {}}
    plateau["attacks"]["force-flagged"] = {
        "robust": {"base": [True, False, False, False]},
        "newly_broken": {"steps x2": 0.25, "eot x2": 0.0, "restarts x2": 0.0},
        "plateaued": False,
        "accuracy_vs_eps": {"0.3": 0.25, "1": 0.0},
    }
    (out / "plateau.json").write_text(json.dumps(plateau))
    assert rerender([str(out)]) == 0
    md = (out / "report.md").read_text()
    assert "| MI-PL | " in md and "| agree |" in md
    assert (
        "Plateau on the first 4 images" in md
        and "`force-flagged` **not plateaued** (newly broken: steps x2 25.0 %" in md
    )
    again = json.loads((out / "results.json").read_text())
    assert again["sweep"] == sweep and again["plateau"]["attacks"]["force-flagged"]["plateaued"] is False

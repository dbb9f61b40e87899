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


def test_lambda_section_names_agreement_ties_a_better_pick_and_a_better_row():
    # PL: all lambdas equal -> the tie-break picks 0.8; OL: 0.6 gains clean accuracy and loses PGD accuracy
    sweep = _sweep([(0.5, 0.99, 0.0), (0.8, 0.99, 0.0)], [(0.5, 0.94, 0.21), (0.6, 0.99, 0.08)])
    v = _verdicts(_res(0.5, 0.5, sweep))
    assert "no λ of the grid measures better" in v["MI-PL"] and "clean +0.0, PGD +0.0" in v["MI-PL"]
    assert "no λ of the grid measures better" in v["MI-OL"] and "clean +5.0, PGD -13.0" in v["MI-OL"]
    assert "trades one axis for the other" in v["MI-OL"] and "within one image" not in v["MI-OL"]
    assert "within one image" in v["MI-PL"]
    # two images worse on clean, equal under PGD: no gain, and not a trade either
    worse = _sweep([(0.5, 1.0, 0.835), (0.7, 0.99, 0.835)], [(0.5, 0.99, 0.1)])
    worse["plain"] = {"clean": 1.0, "adversarial": 0.835}
    worse["max_clean_drop"] = 0.03
    assert "gains no image on either axis" in _verdicts(_res(0.5, 0.5, worse))["MI-PL"]
    assert set(_verdicts(_res(0.8, 0.6, sweep)).values()) == {"agree"}
    better = _sweep([(0.5, 0.97, 0.0), (0.8, 0.99, 0.05)], [(0.6, 0.99, 0.1)])  # the plain model: 99 % clean, 0 % PGD
    assert "a new bundle version with it is due" in _verdicts(_res(0.5, 0.6, better))["MI-PL"]
    assert "not on the sweep's grid" in _verdicts(_res(0.45, 0.6, better))["MI-PL"]
    assert "No sweep beside this report" in "\n".join(companions.lambda_section({"bundle": {"mi": {}}}))


def test_lambda_verdict_edge_cases_a_better_row_one_image_a_robust_base_and_the_fallback():
    # (a) the pick trades axes, but another row beats the served lambda on both
    rows = [(0.5, 0.90, 0.20), (0.6, 0.95, 0.25), (0.7, 0.99, 0.10)]
    v = _verdicts(_res(0.5, 0.5, _sweep([(0.5, 0.99, 0.0)], rows)))
    assert v["MI-OL"].startswith("the pick does not beat the served λ") and "λ 0.6 does" in v["MI-OL"]
    # (c) half a point on 200 images is one image: a tie, not a new version
    tie = _sweep([(0.5, 0.99, 0.100), (0.8, 0.99, 0.105)], [(0.5, 0.99, 0.1)])
    assert "within one image" in _verdicts(_res(0.5, 0.5, tie))["MI-PL"]
    # a robust base model (the IAT case): the pick is better and the plain model better still, both said
    milder = _sweep([(0.5, 0.99, 0.0)], [(0.6, 0.98, 0.57), (0.8, 0.99, 0.83)])
    milder["plain"] = {"clean": 1.0, "adversarial": 0.835}
    ol = _verdicts(_res(0.5, 0.6, milder))["MI-OL"]
    assert "a new bundle version with it is due" in ol and "measures better still" in ol
    # (d) no lambda keeps clean accuracy: the rule's fallback is named as such
    fallback = _sweep([(0.5, 0.5, 0.3), (0.8, 0.6, 0.1)], [(0.5, 0.99, 0.1)])
    assert fallback["pl"]["pick"] == 0.8
    assert "falls back to the largest" in _verdicts(_res(0.5, 0.5, fallback))["MI-PL"]


def test_the_combined_row_compares_the_served_ol_branch_lambda_and_old_sweeps_say_it_is_missing():
    sweep = _sweep([(0.5, 0.99, 0.0)], [(0.5, 0.99, 0.0)])
    text = "\n".join(companions.lambda_section(_res(0.5, 0.5, sweep)))
    assert "predates the MI-Combined rows" in text and "MI-Combined (OL branch λ)" not in text
    # the IAT case: the served OL branch (0.4) answers flagged inputs nearly at random, 0.8 keeps the plain accuracy
    combined = [(0.4, 0.93, 0.50), (0.8, 0.99, 0.80)]
    sweep["combined"] = _sweep(combined, combined)["pl"]  # same row format and pick rule
    v = _verdicts(_res(0.5, 0.5, sweep))
    assert "a new bundle version with it is due" in v["MI-Combined (OL branch λ)"]
    assert "clean +6.0, PGD +30.0" in v["MI-Combined (OL branch λ)"]
    assert "varies only the λ of the OL branch" in "\n".join(companions.lambda_section(_res(0.5, 0.5, sweep)))
    assert "this version was" not in "\n".join(companions.lambda_section(_res(0.5, 0.5, sweep)))
    derived = _res(0.5, 0.8, sweep)
    derived["bundle"]["training"] = {"derived_from": "b/1", "recalibrated_by": "mixinfer calibrate --new-version 2"}
    assert "this version was: from b/1, by `mixinfer calibrate --new-version 2`" in "\n".join(
        companions.lambda_section(derived)
    )


def test_companions_from_another_setting_are_not_attached(tmp_path: Path):
    res = {"bundle": {"name": "b", "version": "1"}, "threat": {"eps": 0.3}, "seeds": [1, 2, 3], "attack_seed": 0}
    res["test_indices"] = [5, 9, 2, 7]
    (tmp_path / "sweep").mkdir()
    sweep = _sweep([(0.5, 0.99, 0.0)], [(0.5, 0.99, 0.0)]) | {"bundle": {"name": "b", "version": "1"}}
    (tmp_path / "sweep/sweep.json").write_text(json.dumps(sweep | {"eps": 0.1}))
    plateau = {"bundle": {"name": "b", "version": "1"}, "eps": 0.3, "seeds": [1, 2, 3], "attack_seed": 0}
    plateau |= {"n_images": 2, "test_indices": [5, 9], "attacks": {}}
    (tmp_path / "plateau.json").write_text(json.dumps(plateau | {"seeds": [4, 5, 6]}))
    out = companions.attach(res | {"sweep": {"stale": True}}, tmp_path)
    assert "sweep" not in out and "plateau" not in out  # the stale key of an earlier attach is gone too
    assert any("eps 0.1, the report's 0.3" in s for s in out["companions_skipped"])
    assert any("seeds [4, 5, 6]" in s for s in out["companions_skipped"])
    assert "ran on another setting" in companions.plateau_line(out)
    (tmp_path / "sweep/sweep.json").write_text(json.dumps(sweep | {"eps": 0.3}))
    (tmp_path / "plateau.json").write_text(json.dumps(plateau))
    out = companions.attach(res, tmp_path)
    assert out["sweep"]["eps"] == 0.3 and out["plateau"]["n_images"] == 2 and "companions_skipped" not in out
    (tmp_path / "plateau.json").write_text(json.dumps(plateau | {"test_indices": [9, 5]}))
    assert "plateau" not in companions.attach(res, tmp_path)


@pytest.mark.slow
def test_rerender_folds_in_sweep_and_plateau_files_written_after_the_report(tmp_path: Path):
    out = tmp_path / "mnist-iat"
    shutil.copytree(REPO / "docs/robustness/mnist-iat", out)
    for f in ("plateau.json", "plateau.md", "plateau.png", "sweep"):
        shutil.rmtree(out / f, ignore_errors=True) if f == "sweep" else (out / f).unlink(missing_ok=True)
    res = json.loads((out / "results.json").read_text())
    mi = res["bundle"]["mi"]
    (out / "sweep").mkdir()
    sweep = _sweep([(mi["lam_pl"], 0.99, 0.1)], [(mi["ol_standalone"]["lam"], 0.99, 0.2)]) | {"eps": 0.3}
    (out / "sweep/sweep.json").write_text(json.dumps(sweep))
    plateau = {"n_images": 4, "eps": res["threat"]["eps"], "seeds": res["seeds"], "tolerance": 0.01, "attacks": {}}
    plateau["attacks"]["force-flagged"] = {
        "robust": {"base": [True, False, False, False]},
        "robust_at_base": 1,
        "newly_broken": {"steps x2": 0.25, "eot x2": 0.0, "restarts x2": 0.0},
        "plateaued": False,
        "accuracy_vs_eps": {"0.3": 0.25, "1": 0.0},
    }
    (out / "plateau.json").write_text(json.dumps(plateau))
    assert rerender([str(out)]) == 0
    md = (out / "report.md").read_text()
    assert "| MI-PL | " in md and "| agree |" in md
    assert "Plateau on the first 4 images" in md
    assert "`force-flagged` **not plateaued** (robust at the base setting: 1 of 4 images; newly broken images: " in md
    assert "steps x2 1, eot x2 0, restarts x2 0; unbounded ε: 0 %" in md
    again = json.loads((out / "results.json").read_text())
    assert again["sweep"] == sweep and again["plateau"]["attacks"]["force-flagged"]["plateaued"] is False

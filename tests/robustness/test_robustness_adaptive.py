"""The attacks on every decision of MI-Combined move in the direction they claim, on a small real MNIST bundle.

Smoke versions (a few steps, a few EOT draws) of the force-flagged, keep-unflagged (pl_aware), smooth-switch,
targeted-through-MI and APGD-EOT attacks; every check scores the result with the served ONNX engine.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from service.mi.params import Mode
from service.robustness.attacks import apgd, eot_combined, force_flagged, pgd, pl_aware, smooth_switch
from service.robustness.attacks.core import pgd_linf, quantize
from service.robustness.data import load_split
from service.robustness.pipeline import DifferentiableMI
from service.robustness.served import ServedScorer

N = 12
EPS = 0.3
SMOKE = {"eps": EPS, "step": 0.05, "steps": 8, "eot": 2}


@pytest.fixture(scope="module")
def twin(mnist_bundle):
    return DifferentiableMI.from_bundle(mnist_bundle)


@pytest.fixture(scope="module")
def scorer(mnist_bundle):
    return ServedScorer.from_bundle(mnist_bundle, [21, 22, 23])


@pytest.fixture(scope="module")
def data(mnist_bundle):
    x, y, _ = load_split(mnist_bundle, "test", N)
    return torch.from_numpy(x), torch.from_numpy(y)


def _served(scorer, x_adv, x):
    return scorer.score(quantize(x_adv, x, EPS).numpy(), Mode.COMBINED)


def test_force_flagged_routes_inputs_into_the_ol_branch_and_keep_unflagged_keeps_them_out(twin, scorer, data):
    x, y = data
    tau = twin.params.threshold
    clean = scorer.score(x.numpy(), Mode.COMBINED)
    forced = _served(scorer, force_flagged.force_flagged_pgd(twin, x, y, gen=np.random.default_rng(0), **SMOKE), x)
    kept = _served(scorer, pl_aware.pl_aware_pgd(twin, x, y, gen=np.random.default_rng(0), **SMOKE), x)
    # independent expectation: the served gap (fresh server draws) against the manifest's threshold; this briefly
    # trained fixture cannot lift every gap past tau in 8 steps (a gap-only attack flags about half), so the
    # direction is checked against the clean inputs and against the opposite attack
    rates = (clean.flagged.mean(), forced.flagged.mean(), kept.flagged.mean())
    assert rates[1] >= rates[0] + 0.2 and rates[1] >= rates[2] + 0.3, rates
    assert np.median(forced.gap) > np.median(clean.gap) and (forced.gap >= tau).mean() == rates[1]
    assert rates[2] <= 0.1 and np.median(kept.gap) < tau, kept.gap
    # and both fool what they route into: accuracy (all seeds) below the clean one
    yn = y.numpy()
    assert (forced.label == yn).all(0).mean() < (clean.label == yn).all(0).mean()


def test_smooth_switch_anneals_and_lowers_served_combined_accuracy(twin, scorer, data):
    x, y = data
    sched = smooth_switch.Temperature(0.1, 0.005, 8)
    sched.set(0)
    assert sched.t == pytest.approx(0.1)
    sched.set(8)
    assert sched.t == pytest.approx(0.005)
    trace: list[float] = []
    x_adv = smooth_switch.smooth_switch_pgd(twin, x, y, gen=np.random.default_rng(1), trace=trace, **SMOKE)
    assert (x_adv - x).abs().max() <= EPS + 1e-6
    clean = (scorer.score(x.numpy(), Mode.COMBINED).label == y.numpy()).all(0).mean()
    adv = (_served(scorer, x_adv, x).label == y.numpy()).all(0).mean()
    assert adv <= 0.5 * clean, (clean, adv)
    assert len(trace) == SMOKE["steps"] + 1 and trace[-1] > trace[0]  # the hard-switch CE rose


@pytest.mark.parametrize("attack", ["eot-combined", "pl-aware", "force-flagged", "smooth-switch"])
def test_targeted_attacks_through_mi_hit_their_target(twin, scorer, data, attack):
    x, y = data
    target = pgd.random_targets(y, 10, np.random.default_rng(2))
    fn = {
        "eot-combined": eot_combined.eot_pgd_combined,
        "pl-aware": pl_aware.pl_aware_pgd,
        "force-flagged": force_flagged.force_flagged_pgd,
        "smooth-switch": smooth_switch.smooth_switch_pgd,
    }[attack]
    x_adv = fn(twin, x, target, gen=np.random.default_rng(3), targeted=True, **{**SMOKE, "steps": 12})
    served = _served(scorer, x_adv, x)
    hit = served.label == target.numpy()
    if attack == "force-flagged":  # the fixture cannot flag every input (see above): judge the OL answers
        assert served.flagged.mean() >= 0.3
        hit = hit[served.flagged]
    assert hit.mean() >= 0.3, hit  # chance is 1/9 (mean over seeds and images)


def test_pgd_keeps_the_best_iterate_not_the_last():
    # a misleading gradient: the loss is the pixel sum but the step descends it, so every step makes things worse
    x = torch.full((4, 1, 3, 3), 0.5)
    gen = torch.Generator().manual_seed(0)

    def grad_fn(xa, _):
        return xa.flatten(1).sum(1), -torch.ones_like(xa)

    trace: list[float] = []
    out = pgd_linf(x, torch.zeros(4, dtype=torch.int64), grad_fn, eps=0.1, step=0.05, steps=4, gen=gen, trace=trace)
    start = x + (torch.rand(x.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1) * 0.1
    torch.testing.assert_close(out, start)  # the random start had the highest loss
    assert trace == sorted(trace, reverse=True) and len(trace) == 5


def test_apgd_checkpoints_follow_croce_and_hein():
    assert apgd.checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]


def test_apgd_eot_attacks_every_image_and_keeps_the_best_iterate(twin, scorer, data):
    x, y = data
    gen = np.random.default_rng(4)
    loss = eot_combined.combined_loss(twin, gen)
    trace: list[float] = []
    x_adv = apgd.apgd_eot(loss, x, y, eps=EPS, steps=10, eot=2, gen=gen, restarts=2, trace=trace)
    assert (x_adv - x).abs().max() <= EPS + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    assert ((x_adv - x).flatten(1).abs().amax(1) > 0).all()  # every image moved, misclassified ones included
    assert len(trace) == 2 * 11
    clean = (scorer.score(x.numpy(), Mode.COMBINED).label == y.numpy()).all(0).mean()
    adv = (_served(scorer, x_adv, x).label == y.numpy()).all(0).mean()
    assert adv <= 0.5 * clean, (clean, adv)


@pytest.mark.slow
def test_plateau_compares_image_by_image_reaches_zero_unbounded_and_resumes(mnist_bundle_dir, tmp_path, caplog):
    from service.cli import main
    from service.robustness.plateau import EPS_LADDER

    out, cache = tmp_path / "out", tmp_path / "cache"
    out.mkdir()
    (out / "report.md").write_text("the report of another run\n")
    argv = ["evaluate", "--bundle", str(mnist_bundle_dir), "--budget", "quick", "--out", str(out)]
    argv += ["--cache-dir", str(cache), "--plateau", "eot-combined", "--plateau-only", "--plateau-images", "6"]
    argv += ["--seeds", "1", "2", "3", "--threads", "1", "--device", "cpu", "--no-progress"]
    assert main(argv) == 0
    res = json.loads((out / "plateau.json").read_text())
    assert res["n_images"] == 6 and res["seeds"] == [1, 2, 3]
    r = res["attacks"]["eot-combined"]
    base = np.asarray(r["robust"]["base"])
    assert base.size == 6
    for knob in ("steps x2", "eot x2", "restarts x2"):
        doubled = np.asarray(r["robust"][knob])
        assert r["newly_broken"][knob] == pytest.approx(float((base & ~doubled).mean()))
    assert r["plateaued"] == all(v <= 0.01 for v in r["newly_broken"].values())
    assert list(r["accuracy_vs_eps"]) == [f"{e:g}" for e in EPS_LADDER]
    assert r["accuracy_vs_eps"]["0.3"] == pytest.approx(base.mean())  # the ladder's headline point is the base run
    assert r["accuracy_vs_eps"]["1"] == 0.0  # an unbounded attack always succeeds
    assert "| eot-combined |" in (out / "plateau.md").read_text() and (out / "plateau.png").exists()
    assert (out / "report.md").read_text() == "the report of another run\n"  # --plateau-only leaves the report
    assert len(list(cache.glob("plateau-eot-combined-*.npz"))) == 4 + len(EPS_LADDER) - 1
    caplog.clear()
    with caplog.at_level("INFO", logger="service.robustness.cache"):
        assert main(argv) == 0  # a second run resumes every run from the cache and scores the same
    assert sum("resumed from" in m for m in caplog.messages) == 4 + len(EPS_LADDER) - 1
    assert json.loads((out / "plateau.json").read_text())["attacks"] == res["attacks"]
    other = [a if a != "eot-combined" else "pl-aware" for a in argv]  # another process, another attack, same dir
    assert main(other) == 0
    both = json.loads((out / "plateau.json").read_text())["attacks"]
    assert set(both) == {"eot-combined", "pl-aware"} and both["eot-combined"] == res["attacks"]["eot-combined"]
    assert "| pl-aware |" in (out / "plateau.md").read_text() and "| eot-combined |" in (out / "plateau.md").read_text()


def test_plateau_refuses_attacks_the_knobs_do_not_touch_and_a_setting_other_than_the_report_beside_it(tmp_path, caplog):
    import shutil
    from pathlib import Path

    from service.cli import main

    repo = Path(__file__).resolve().parents[2]
    out = tmp_path / "report"
    out.mkdir()
    shutil.copy(repo / "docs/robustness/mnist-iat/results.json", out / "results.json")
    res = json.loads((out / "results.json").read_text())
    base = ["evaluate", "--bundle", str(repo / "model_store/mnist-iat/1"), "--out", str(out), "--no-cache"]
    base += ["--n-images", str(len(res["test_indices"])), "--plateau-only"]
    with caplog.at_level("ERROR"):
        assert main([*base, "--plateau", "pgd-gt"]) == 2  # oblivious: EOT and restarts do not touch it
        assert main([*base, "--plateau", "force-flagged-targeted"]) == 2  # targeted: needs its targets
        assert main([*base, "--plateau", "smooth-switch", "--plateau-images", "0"]) == 2
        assert main([*base, "--plateau", "smooth-switch", "--eps", "0.1"]) == 2  # the report ran at 0.3
        assert main([*base, "--plateau", "smooth-switch", "--seeds", "7", "8", "9"]) == 2
    text = caplog.text
    assert "not an untargeted adaptive attack" in text and "eps 0.1 (the report's: 0.3)" in text
    assert "seeds [7, 8, 9] (the report's: [101, 102, 103])" in text
    assert not (out / "plateau.json").exists()


def test_a_warm_start_begins_the_first_restart_there_and_the_others_at_random():
    x = torch.full((2, 1, 3, 3), 0.5)
    start = x + torch.tensor([0.05, 0.4]).view(2, 1, 1, 1)  # the second lies outside the 0.1-ball: projected
    firsts: list[torch.Tensor] = []

    def grad_fn(xa, _):
        firsts.append(xa.clone())
        return xa.flatten(1).sum(1), torch.zeros_like(xa)  # a zero gradient: every step stays where it started

    y = torch.zeros(2, dtype=torch.int64)
    pgd_linf(x, y, grad_fn, eps=0.1, step=0.05, steps=1, restarts=2, gen=torch.Generator().manual_seed(0), start=start)
    torch.testing.assert_close(firsts[0], x + torch.tensor([0.05, 0.1]).view(2, 1, 1, 1))
    assert len(firsts) == 4 and not torch.equal(firsts[2], firsts[0])  # restart 2: a random point
    assert ((firsts[2] - x).abs() <= 0.1 + 1e-6).all()


def test_the_from_transfer_row_hands_its_base_model_pgd_point_to_the_attack_through_mi(twin, scorer, data, monkeypatch):
    from service.robustness.budgets import THREATS, ThreatScale, get_budget
    from service.robustness.plan import Context, attack_plan

    x, y = data
    budget, threat = get_budget("quick"), THREATS[ThreatScale.MNIST]
    spec = next(s for s in attack_plan(budget, threat) if s.name.startswith("eot-combined-from-transfer@"))
    transfer_point = (x + 0.25).clamp(0, 1)
    seen: dict[str, object] = {}

    def base_pgd(logits, xb, yb, **kw):  # the transfer attack's recipe, on the base model's own logits
        seen["pgd"] = {"logits": logits, "steps": kw["steps"], "eps": kw["eps"]}
        return transfer_point[: xb.shape[0]]

    def through_mi(loss_fn, xb, yb, **kw):
        seen["start"], seen["steps"] = kw["start"], kw["steps"]
        return xb

    monkeypatch.setattr(pgd, "pgd_untargeted", base_pgd)
    monkeypatch.setattr(eot_combined, "eot_pgd_linf", through_mi)
    ctx = Context(mi=twin, scorer=scorer, budget=budget, threat=threat, gen=np.random.default_rng(0))
    spec.run(ctx, x, y)
    assert seen["pgd"] == {"logits": twin.logits, "steps": budget.transfer_steps, "eps": threat.eps}
    assert seen["start"] is not None and torch.equal(seen["start"], transfer_point)
    assert seen["steps"] == budget.adaptive_steps

"""The attack cache's keys: a new bundle version that only changes an OL λ reuses every attack that does not read
it, and the reused inputs are exactly the arrays the new version would have produced.

The whole plan runs (quick budget, 4 images) on version 1 and on two derived versions, one with another stand-alone
MI-OL λ and one with another λ for MI-Combined's OL branch, each in a cache of its own. An attack that ``READS`` does
not list as a reader of the changed field, but that did read it, would produce other arrays under the shared key, and
fail here. Before scoping (every MI parameter in every key), a derived version matched no entry at all.
"""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from service.cli import main


def _entries(cache: Path) -> dict[str, Path]:
    return {p.name: p for p in cache.glob("*.npz")}


def _attack(entry: str) -> str:
    """The attack name of a cache file: ``<attack>_<eps>-s<seed>-<key>.npz`` (the file name's "_" stands for "@")."""
    return re.sub(r"_(?=[0-9.e-]+$)", "@", entry.rsplit("-s", 1)[0])


BUDGET_IMAGES = 4
KW = {"seeds": [1, 2, 3], "show_progress": False}


@pytest.fixture(scope="module")
def version_1(mnist_bundle_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(version 1 of a private copy of the fixture bundle, the cache of its whole quick plan)."""
    from service.robustness.budgets import get_budget
    from service.robustness.evaluate import run_evaluation
    from service.store import load_bundle

    root = tmp_path_factory.mktemp("versions")
    v1 = root / "mnist-test" / "1"
    shutil.copytree(mnist_bundle_dir, v1)
    budget = get_budget("quick", n_images=BUDGET_IMAGES)
    run_evaluation(load_bundle(v1, require_weights=True), budget, cache_dir=root / "c1", **KW)
    return v1, root / "c1"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("flag", "field", "version"),
    [("--lam-ol-standalone", "ol_standalone", "2"), ("--lam-ol-combined", "ol_combined", "3")],
)
def test_a_version_with_another_ol_lambda_reuses_every_attack_that_does_not_read_it(
    version_1: tuple[Path, Path], tmp_path: Path, flag: str, field: str, version: str, caplog: pytest.LogCaptureFixture
):
    from service.robustness.budgets import get_budget
    from service.robustness.cache import reads
    from service.robustness.evaluate import run_evaluation
    from service.store import load_bundle

    v1, c1 = version_1
    caplog.set_level(logging.WARNING, logger="service.robustness.cache")
    # a new version keeps its source's rule (here fixed=0.2); said explicitly, as a user pinning it would
    assert main(["calibrate", "--bundle", str(v1), "--new-version", version, flag, "0.9", "--threshold", "0.2"]) == 0
    b1, b2 = load_bundle(v1, require_weights=True), load_bundle(v1.parent / version, require_weights=True)
    assert getattr(b2.manifest.mi, field).lam == 0.9 != getattr(b1.manifest.mi, field).lam
    assert b2.manifest.mi.model_dump(exclude={field}) == b1.manifest.mi.model_dump(exclude={field})

    budget = get_budget("quick", n_images=BUDGET_IMAGES)
    run_evaluation(b2, budget, cache_dir=tmp_path / "c2", **KW)  # computed afresh, in a cache of its own
    e1, e2 = _entries(c1), _entries(tmp_path / "c2")
    assert len(e1) == len(e2) > 20  # the whole plan
    readers = sorted(_attack(n) for n in set(e1) - set(e2))
    assert readers and all(field in reads(r) for r in readers)
    assert len(readers) == sum(field in reads(_attack(n)) for n in e1)
    for name in set(e1) & set(e2):  # the same key holds the same arrays: the attack never read the changed field
        with np.load(e1[name], allow_pickle=False) as a, np.load(e2[name], allow_pickle=False) as b:
            np.testing.assert_array_equal(a["x_adv"], b["x_adv"], err_msg=name)
            np.testing.assert_array_equal(a["trace"], b["trace"], err_msg=name)

    # and with the first version's cache, the new one resumes every attack but the readers of the field
    shutil.copytree(c1, tmp_path / "shared")
    only = ("eot-combined@", "pl-aware@", "ol-standalone@", "ol-direct@")
    again = run_evaluation(b2, budget, cache_dir=tmp_path / "shared", only=only, **KW)
    for row in again["attacks"]:
        assert row["resumed"] is not (field in reads(row["name"])), row["name"]
    assert "not in cache.READS" not in caplog.text  # every attack of the plan was looked up by its real name


def _names_of_every_plan() -> set[str]:
    """Every attack name of every budget, threat model and twin setting, and the plateau runs of the plateau-able."""
    from service.robustness.budgets import BUDGETS, THREATS, get_budget
    from service.robustness.cache import plateau_name
    from service.robustness.plan import ADAPTIVE, attack_plan
    from service.robustness.plateau import EPS_LADDER

    knobs = ("base", "steps x2", "eot x2", "restarts x2", *(f"eps{e:g}" for e in EPS_LADDER))  # run_plateau's
    names = set()
    for budget in BUDGETS:
        for threat in THREATS.values():
            for twin in (True, False):
                for spec in attack_plan(get_budget(budget), threat, twin=twin):
                    names.add(spec.name)
                    if spec.group == ADAPTIVE and not spec.targets:
                        names |= {plateau_name(spec.name.split("@")[0], k) for k in knobs}
    return names


def test_every_attack_of_every_plan_and_its_plateau_runs_say_what_they_read(caplog):
    """An unlisted attack would still be safe (its key takes every scoped field) but would never reuse an entry across
    versions: the plans list them all; a name that matches no entry exactly falls back to every field."""
    from service.robustness.cache import SCOPED_MI, family, reads

    for name in _names_of_every_plan():
        assert family(name) is not None, name
    assert family("force-flagged-targeted@0.3") == "force-flagged-targeted"
    assert family("plateau-eot-combined-from-transfer-eotx2") == "eot-combined-from-transfer"
    assert reads("transfer@0.3") == () and reads("square-label@0.3") == ("ol_combined",)
    for unknown in ("bpda-through-mi@0.3", "transfer-targeted@0.3", "plateau-pl-aware-v2-base", "pl-aware_0.3"):
        assert family(unknown) is None and reads(unknown) == SCOPED_MI, unknown
    assert "not in cache.READS" in caplog.text


#: the scheme the entries cached before READS were keyed by (a field went into the keys of the attacks whose name
#: contained one of these): READS must give every existing name the same fields, or hours of cached attacks are lost
SUBSTRING_SCHEME = {
    "ol_standalone": ("ol-standalone",),
    "ol_combined": ("eot-combined", "force-flagged", "smooth-switch", "ol-direct", "apgd-", "square-", "autoattack"),
}


#: AttackCache(None, {"x": 1}, {"ol_standalone": {"lam": 0.5}, "ol_combined": {"lam": 0.4}}).key(...) of transfer@0.3
#: and force-flagged@0.3, computed by the substring scheme's code (commit ed5fa21)
PINNED_KEYS = ("06d63284ad9a17d6", "b7d4b8f4c7c63b1d")


def test_the_table_keys_every_attack_as_the_substring_scheme_did():
    from service.robustness.cache import SCOPED_MI, AttackCache, reads

    for name in _names_of_every_plan():
        assert set(reads(name)) == {f for f in SCOPED_MI if any(a in name for a in SUBSTRING_SCHEME[f])}, name
    # and the digests themselves: these two were written by the substring scheme's code
    cache = AttackCache(None, {"x": 1}, {"ol_standalone": {"lam": 0.5}, "ol_combined": {"lam": 0.4}})
    assert (cache.key("transfer@0.3"), cache.key("force-flagged@0.3")) == PINNED_KEYS

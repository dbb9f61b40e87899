"""`mixinfer calibrate --new-version V --lam-...`: ship changed MI parameters as a new version, never in place.

The bundle is a real imported one (a small ONNX classifier plus labelled PNG folders, see ``importmodels``), so
calibration and the recorded accuracies run through the real engine.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from importmodels import Variant, build_model, import_args, save, write_folder

from service.cli import main
from service.manifest import MANIFEST_FILE
from service.store import load_bundle


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> tuple[Path, Path]:
    """(store root, data dir) holding the imported bundle ``held/1``."""
    root = tmp_path_factory.mktemp("versions")
    data = write_folder(root / "images")
    model = save(build_model(Variant("plain")), root / "plain.onnx")
    assert main(import_args(model, data, root / "store", "held")) == 0
    return root / "store", data


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_new_version_copies_the_files_and_changes_only_the_given_lambda(store, capsys):
    root, data = store
    v1 = root / "held" / "1"
    before = _sha(v1 / MANIFEST_FILE)
    args = ["calibrate", "--bundle", str(v1), "--data-dir", str(data), "--new-version", "2"]
    assert main([*args, "--lam-ol-standalone", "0.8"]) == 0
    assert '"bundle"' in capsys.readouterr().out
    old, new = load_bundle(v1).manifest, load_bundle(root / "held" / "2").manifest
    assert _sha(v1 / MANIFEST_FILE) == before  # the served version is untouched
    assert new.version == "2" and new.name == "held" and new.files == old.files
    assert new.mi.ol_standalone.lam == 0.8 and new.mi.ol_standalone.n == old.mi.ol_standalone.n
    # nothing else of MI moved: the gap comes from MI-PL, so the same eval seed calibrates the same threshold
    assert new.mi.model_dump(exclude={"ol_standalone"}) == old.mi.model_dump(exclude={"ol_standalone"})
    assert new.calibration == old.calibration
    assert (new.accuracy.plain, new.accuracy.mi_pl, new.accuracy.mi_combined) == (
        old.accuracy.plain,
        old.accuracy.mi_pl,
        old.accuracy.mi_combined,
    )
    assert new.recipe.training["derived_from"] == "held/1"
    assert "--new-version 2" in str(new.recipe.training["recalibrated_by"])


def _refusal(capsys, argv: list[str]) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(argv)
    return str(exc.value)


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        (["--lam-ol-standalone", "0.8"], "needs --new-version"),  # never in place
        (["--new-version", "1", "--lam-pl", "0.6"], "exists"),
        (["--new-version", "3", "--lam-ol-combined", "1.5"], "expected 0 < lam <= 1, got 1.5"),
        (["--new-version", "x", "--lam-pl", "0.6"], "got 'x'"),
        (["--new-version", "01", "--lam-pl", "0.6"], "without leading zeros"),  # the store would not load it
        (["--new-version", "\u00b2", "--lam-pl", "0.6"], "positive integer"),  # str.isdigit() says yes
        (["--new-version", "1234567890", "--lam-pl", "0.6"], "1-999999999"),
        (["--new-version", "../x", "--lam-pl", "0.6"], "positive integer"),
        (["--sweep", "--new-version", "3", "--lam-pl", "0.6"], "never writes a bundle"),
    ],
)
def test_refusals_leave_the_store_as_it_was(store, capsys, extra, says):
    root, data = store
    versions = sorted(p.name for p in (root / "held").iterdir())
    message = _refusal(capsys, ["calibrate", "--bundle", str(root / "held" / "1"), "--data-dir", str(data), *extra])
    assert says in message
    assert sorted(p.name for p in (root / "held").iterdir()) == versions


def test_a_dangling_link_in_place_of_the_version_is_refused(store, tmp_path, capsys):
    root, data = store
    (root / "held" / "8").symlink_to(tmp_path / "nowhere")
    try:
        args = ["calibrate", "--bundle", str(root / "held" / "1"), "--data-dir", str(data), "--new-version", "8"]
        assert "exists" in _refusal(capsys, args)
    finally:
        (root / "held" / "8").unlink()


def _own_copy(store, tmp_path: Path) -> Path:
    import shutil

    root, _ = store
    mine = tmp_path / "held"
    shutil.copytree(root / "held" / "1", mine / "1")
    return mine


def test_a_failed_calibration_leaves_no_version_and_no_staging(store, tmp_path, monkeypatch):
    from service.training import bundle

    _, data = store
    mine = _own_copy(store, tmp_path)

    def broken(*args, **kwargs):
        raise RuntimeError("measurement failed")

    monkeypatch.setattr(bundle, "split_accuracy", broken)
    args = ["calibrate", "--bundle", str(mine / "1"), "--data-dir", str(data), "--new-version", "4", "--lam-pl", "0.6"]
    with pytest.raises(RuntimeError, match="measurement failed"):
        main(args)
    assert sorted(p.name for p in mine.iterdir()) == ["1"]  # no "4", no half-made directory
    assert not list(tmp_path.glob(".staging-*"))  # the staging root is gone too


def test_a_new_version_keeps_its_sources_threshold_rule_unless_told_otherwise(store, tmp_path):
    _, data = store
    mine = _own_copy(store, tmp_path)
    base = ["calibrate", "--data-dir", str(data)]
    assert main([*base, "--bundle", str(mine / "1"), "--threshold", "0.2"]) == 0  # the paper's fixed threshold
    assert main([*base, "--bundle", str(mine / "1"), "--new-version", "2", "--lam-ol-standalone", "0.8"]) == 0
    assert load_bundle(mine / "2").manifest.mi.threshold_rule == "fixed=0.2"
    assert main([*base, "--bundle", str(mine / "2"), "--new-version", "3", "--target-fpr", "0.1"]) == 0
    assert load_bundle(mine / "3").manifest.mi.threshold_rule == "target_fpr=0.1"  # an explicit rule wins


def test_a_copy_that_fails_its_hash_is_refused(store, tmp_path):
    from service.training import versions

    mine = _own_copy(store, tmp_path)
    manifest = load_bundle(mine / "1").manifest
    bad = manifest.model_copy(update={"files": {**manifest.files, "pool.npz": "0" * 64}})
    (tmp_path / "staging").mkdir()
    with pytest.raises(SystemExit, match="does not match its manifest's sha256"):
        versions.copy_version(mine / "1", bad, tmp_path / "staging")


def test_the_source_versions_report_names_the_versions_derived_from_it(store):
    from service.robustness.companions import derived_versions

    root, data = store
    v1 = root / "held" / "1"
    args = ["calibrate", "--bundle", str(v1), "--data-dir", str(data), "--new-version", "7", "--lam-ol-combined", "0.9"]
    assert main(args) == 0
    info = {"path": str(v1), "name": "held", "version": "1", "mi": load_bundle(v1).manifest.mi.model_dump(mode="json")}
    found = derived_versions(info)
    assert "`held/7` (MI-Combined (OL branch λ) = 0.9)" in found
    assert all("held/1`" not in f for f in found)  # not itself
    assert derived_versions({**info, "path": str(root / "gone" / "1")}) == []  # store not at hand: nothing said

"""The committed example PNGs still behave as examples/README.md says on the bundle `make serve` serves."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from service.mi.engine import MIEngine
from service.mi.params import Mode
from service.store import list_versions, load_bundle, open_backend

ROOT = Path(__file__).resolve().parents[2]
STORE = ROOT / "model_store"
BUNDLE = STORE / "mnist-mixup" / (list_versions(STORE, "mnist-mixup") or ["1"])[-1]  # the served (highest) version
EXAMPLES = ROOT / "examples"
RUNS = 20


def _flags(paths: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    bundle = load_bundle(BUNDLE)
    engine = MIEngine(open_backend(bundle, providers=["CPUExecutionProvider"]), bundle.pool_labels, bundle.manifest.mi)
    imgs = []
    for p in paths:
        with Image.open(p) as im:
            imgs.append(np.asarray(im, dtype=np.float32)[None] / 255.0)
    x = np.stack(imgs)
    flags = np.zeros(len(paths), dtype=int)
    for seed in range(RUNS):  # fixed seeds: deterministic in CI
        flags += engine(x, Mode.COMBINED, rng=np.random.default_rng(1000 + seed)).flagged
    plain = engine.backend.probs(x).argmax(1)
    return flags, plain


@pytest.mark.skipif(not BUNDLE.exists() or not EXAMPLES.exists(), reason="default bundle or examples not present")
def test_examples_were_made_on_the_served_bundle():
    """A new default version ships with examples made or rechecked on it (`make examples`, `make examples-recheck`)."""
    made_on = (EXAMPLES / "README.md").read_text().splitlines()[2]
    assert made_on.startswith(f"Bundle `mnist-mixup/{BUNDLE.name}`;"), made_on


@pytest.mark.skipif(not BUNDLE.exists() or not EXAMPLES.exists(), reason="default bundle or examples not present")
def test_adversarial_examples_are_flagged_and_clean_ones_are_not():
    adv = sorted(EXAMPLES.glob("adversarial_*.png"))
    clean = sorted(EXAMPLES.glob("clean_*.png"))
    assert adv and clean
    flags, plain = _flags(adv + clean)
    n = len(adv)
    # generated and checked at >= 19/20 fresh-seed runs; allow a little seed noise here
    assert (flags[:n] >= 17).all(), flags[:n]
    truths = [int(p.stem.split("true")[1]) for p in adv]
    assert (plain[:n] != truths).all()  # they do fool the undefended model
    assert (flags[n:] <= 5).all(), flags[n:]
    assert (plain[n:] == [int(p.stem.split("_")[1]) for p in clean]).all()


def _copy_examples(dst: Path, names: list[str] | None = None) -> None:
    for png in EXAMPLES.glob("*.png"):
        if names is None or png.name in names:
            (dst / png.name).write_bytes(png.read_bytes())
    (dst / "README.md").write_text((EXAMPLES / "README.md").read_text())


def _recheck(out: Path) -> int:
    from service.robustness.examples import main

    return main(["--bundle", str(BUNDLE), "--out", str(out), "--recheck", "--seed", "1000"])  # fixed draws: repeatable


@pytest.mark.skipif(not BUNDLE.exists() or not EXAMPLES.exists(), reason="default bundle or examples not present")
def test_recheck_rewrites_the_table_for_the_files_it_found_and_keeps_how_they_were_made(tmp_path):
    _copy_examples(tmp_path)
    assert _recheck(tmp_path) == 0
    readme = (tmp_path / "README.md").read_text().splitlines()
    assert readme[-1] == (EXAMPLES / "README.md").read_text().splitlines()[-1]  # "Adversarial files: ..."
    assert "--recheck --seed 1000" in readme[2] and "20 runs (engine seed 1000)" in readme[2]
    rows = [line for line in readme if line.startswith("| ")][1:]
    assert sorted(r.split(" | ")[0][2:] for r in rows) == sorted(p.name for p in EXAMPLES.glob("*.png"))
    for row in rows:  # file | true label | base model says | majority | flagged in
        name, true, base, _, flagged = (c.strip() for c in row.strip("|").split("|"))
        hits, runs = map(int, flagged.split("/"))
        assert runs == 20
        assert (base != true and hits >= 19) if name.startswith("adversarial_") else (base == true and hits <= 5)


@pytest.mark.skipif(not BUNDLE.exists() or not EXAMPLES.exists(), reason="default bundle or examples not present")
def test_recheck_fails_on_a_clean_digit_posing_as_adversarial_and_keeps_the_readme(tmp_path, caplog):
    _copy_examples(tmp_path, ["clean_7.png"])
    (tmp_path / "adversarial_0_true7.png").write_bytes((EXAMPLES / "clean_7.png").read_bytes())
    before = (tmp_path / "README.md").read_text()
    assert _recheck(tmp_path) == 1
    assert (tmp_path / "README.md").read_text() == before
    assert re.search(r"adversarial_0_true7.png: flagged in \d/20 \(expected >= 19\), base model right", caplog.text)


@pytest.mark.skipif(not BUNDLE.exists() or not EXAMPLES.exists(), reason="default bundle or examples not present")
def test_recheck_refuses_a_folder_without_adversarial_files_and_names_it_cannot_read(tmp_path, caplog):
    _copy_examples(tmp_path, ["clean_7.png"])
    (tmp_path / "clean_seven.png").write_bytes((EXAMPLES / "clean_7.png").read_bytes())
    assert _recheck(tmp_path) == 1
    assert "clean_seven.png: true label 'seven' from the file name, expected one of ['0', '1'," in caplog.text
    assert "expected clean_*.png and adversarial_*_true*.png files, got 2 and 0" in caplog.text

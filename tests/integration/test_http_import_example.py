"""The "Serve your own model" example of docs/models.md, end to end at a smaller size: examples/byom/make_model.py, then
`mixinfer import` with its flags, then a real server answering its curl image."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from mixserver import run_server, settings_for

from service.cli import main
from service.store import load_bundle

pytestmark = [pytest.mark.integration, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]


def test_readme_byom_example(tmp_path):
    out = tmp_path / "byom"
    make = [sys.executable, str(REPO / "examples" / "byom" / "make_model.py"), "--out", str(out), "--per-class", "100"]
    subprocess.run(make, cwd=REPO, check=True, capture_output=True, timeout=600)
    flags = ["--input-layout", "nhwc", "--mean", "0.1307", "--std", "0.3081", "--name", "byom"]
    args = ["import", "--onnx", str(out / "model.onnx"), "--dataset", "imagefolder", "--data-dir", str(out / "digits")]
    assert main([*args, *flags, "--store", str(out / "store")]) == 0
    m = load_bundle(out / "store" / "byom" / "1").manifest
    assert m.imported.batch == "dynamic" and m.imported.input_layout == "nhwc" and m.accuracy.plain >= 0.8
    # the model the test trains sees 100 digits per class: unsure enough that MI's random mixes may move its answer
    # (a fresh-clone run answered '0' at p 0.27 against '5' at 0.19), so the label is pinned with the model alone
    # (mode off) and the defended answer only for its shape
    settings = settings_for(out / "store", name="byom", allow_mode_override=True, seed=0)
    with run_server(settings) as srv:
        files = {"image": ("clean_5.png", (REPO / "examples" / "clean_5.png").read_bytes(), "image/png")}
        plain = srv.client.post("/predict", params={"mode": "off"}, files=files)
        defended = srv.client.post("/predict", files=files)
    assert plain.status_code == 200 and plain.json()["predictions"][0]["label"] == "5", plain.text
    assert defended.status_code == 200, defended.text
    assert defended.json()["predictions"][0]["label"] in m.class_names

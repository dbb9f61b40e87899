"""``bench/liveness.py`` runs end to end against the real server and reports what it claims (counts, not times)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from relserver import ROOT
from tinybundle import make_tiny_bundle

pytestmark = pytest.mark.integration


def test_liveness_bench_reports_quiet_and_loaded_windows(tmp_path: Path) -> None:
    make_tiny_bundle(tmp_path, name="tiny", shape=(3, 16, 16))
    cmd = [sys.executable, str(ROOT / "bench" / "liveness.py"), "--bundle", str(tmp_path / "tiny")]
    cmd += ["--seconds", "0.5", "--rounds", "1", "--clients", "2", "--json"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=240, check=True, cwd=tmp_path, env=env)
    lines = out.stdout.strip().splitlines()
    result = json.loads(lines[-1])
    assert "| quiet |" in out.stdout and "| png |" in out.stdout and "| json |" in out.stdout
    windows = result["windows"]
    assert set(windows) == {"quiet", "png", "json"}
    for fig in windows.values():
        assert fig["probes"] >= 1 and 0 < fig["p50_ms"] <= fig["p99_ms"] <= fig["max_ms"]
    # every heavy request was answered 200 (the 4096x4096 PNG is within the default pixel limits)
    for kind in ("png", "json"):
        assert set(result["heavy_status"][kind]) == {"200"} and result["heavy_status"][kind]["200"] >= 2
    assert result["worst_p99_ratio"] == max(result["p99_ratio"].values())
    assert result["met"] == (result["worst_p99_ratio"] <= result["target_ratio"] == 10.0)

"""The robustness tables (docs/robustness.md) and the README's summary come from the committed results.json files and
cannot drift."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from service.robustness import tables

ROOT = Path(__file__).resolve().parents[2]


def test_readme_tables_match_the_committed_results():
    argv = ["--doc", str(ROOT / "docs/robustness.md"), "--summary", str(ROOT / "README.md"), "--root", str(ROOT)]
    assert tables.main([*argv, "--check"]) == 0, "robustness tables drifted: run python -m service.robustness.tables"


def _copy(tmp_path: Path) -> Path:
    (tmp_path / "docs").mkdir()
    shutil.copy(ROOT / "docs/robustness.md", tmp_path / "docs/robustness.md")
    shutil.copy(ROOT / "README.md", tmp_path / "README.md")
    for _, d in tables.REPORTS:
        (tmp_path / d).mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / d / "results.json", tmp_path / d / "results.json")
    return tmp_path / "docs/robustness.md"


def test_the_check_fails_when_a_reported_number_changes(tmp_path: Path):
    doc = _copy(tmp_path)
    argv = ["--doc", str(doc), "--summary", str(tmp_path / "README.md"), "--root", str(tmp_path)]
    assert tables.main([*argv, "--check"]) == 0
    path = tmp_path / tables.REPORTS[-1][1] / "results.json"
    res = json.loads(path.read_text())
    n = len(res["test_indices"])
    worst = res["worst_case"]["combined"]["all_attacks"]
    res["worst_case"]["combined"]["all_attacks"] = 1.0 - worst + 1.0 / n
    path.write_text(json.dumps(res))
    assert tables.main([*argv, "--check"]) == 1
    readme_before = (tmp_path / "README.md").read_text()
    assert tables.main(argv) == 0  # regenerating fixes it, in both pages
    assert tables.main([*argv, "--check"]) == 0
    readme = (tmp_path / "README.md").read_text()
    assert readme != readme_before
    new_cell = tables._cell({"worst": 1.0 - worst + 1.0 / n}, n)
    assert f"| {tables.REPORTS[-1][0]} | " in readme and f" | {new_cell} | " in readme


def test_cells_carry_clopper_pearson_intervals():
    # 41 of 100: the exact 95 % interval is [31.3, 51.3] %
    assert tables._cell({"worst": 0.41, "mean": 0.5}, 100) == "41 [31–51]"
    assert tables._cell({"worst": 0.0, "mean": 0.0}, 40) == "0 [0–9]"

"""Smoke run of bench/query_attacks.py: ART's black-box attacks against a real server with the query watch on.

The full run (50 images, 5,000 queries, every attack) writes docs/query-watch/; this one checks the direction on
2 images and 300 queries: both attacks turn their client suspect within 50 queries, ``reject`` stops SimBA, and
benign traffic from 8 clients (resends and re-encodes included) turns no client suspect.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def smoke() -> dict:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "query_attacks.py"), "--smoke", "--eps", "0.1", "--json"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def rows(result: dict, attack: str, policy: str) -> list[dict]:
    found = [r for r in result["rows"] if r["attack"] == attack and r["policy"] == policy]
    assert found, f"no row for {attack}/{policy}"
    return found


@pytest.mark.parametrize("attack", ["simba", "hopskipjump"])
def test_each_attack_turns_its_client_suspect_within_50_queries(smoke, attack):
    for row in rows(smoke, attack, "observe"):
        assert row["detected_within_50"] == row["images"] == 2, row


def test_reject_refuses_simbas_near_copies_so_it_never_succeeds(smoke):
    for row in rows(smoke, "simba", "reject"):
        assert row["refused_mean"] > 0.5 * row["queries_mean"], row
        assert row["success_before_detection"] == 0, row


def test_benign_traffic_turns_no_client_suspect(smoke):
    benign = smoke["benign"]
    assert benign["queries"] >= 200
    assert benign["false_positive_clients"] == 0, benign

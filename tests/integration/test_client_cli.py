"""``mixinfer predict`` against real uvicorn servers: table, JSON lines, batching, per-file failures, keys."""

from __future__ import annotations

import json

import numpy as np
import pytest
from mixserver import png_bytes, run_server, settings_for

from service.cli import main

pytestmark = pytest.mark.integration

KEY = "cli-test-key-0123456789"


@pytest.fixture
def pngs(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for i in range(5):
        path = tmp_path / f"digit{i}.png"
        path.write_bytes(png_bytes(rng.integers(0, 256, (8, 8), dtype=np.uint8)))
        paths.append(str(path))
    return paths


def test_a_table_row_per_file_in_batched_requests(server, pngs, capsys):
    before = server.metric("mixinfer_requests_total", route="/predict", code="200")
    code = main(["predict", "--url", server.base_url, "--batch-size", "2", *pngs])
    out = capsys.readouterr().out.splitlines()
    assert code == 0
    assert out[0].split() == ["file", "label", "adversarial", "gap"]
    assert [line.split()[0] for line in out[1:]] == pngs
    for line in out[1:]:
        _, label, flag, gap = line.split()
        assert label.startswith("class") and flag in ("yes", "no")
        assert -1.0 <= float(gap) <= 1.0
    # 5 files in batches of 2: 3 requests
    assert server.metric("mixinfer_requests_total", route="/predict", code="200") == before + 3


def test_json_prints_one_object_per_file_matching_the_table_fields(server, pngs, capsys):
    assert main(["predict", "--url", server.base_url, "--json", *pngs]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["file"] for r in rows] == pngs
    for r in rows:
        assert r["model"] == "tiny" and r["model_version"] == "1" and r["mode"] in ("pl", "ol")
        assert r["adversarial"] == (r["gap"] >= r["threshold"])
        assert sum(r["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)


def test_a_bad_file_fails_alone_and_the_exit_code_says_so(server, pngs, tmp_path, capsys):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"this is not an image")
    missing = str(tmp_path / "missing.png")
    files = [pngs[0], str(bad), pngs[1], missing]
    assert main(["predict", "--url", server.base_url, "--json", *files]) == 1
    captured = capsys.readouterr()
    rows = {r["file"]: r for r in map(json.loads, captured.out.splitlines())}
    assert rows[pngs[0]]["label"].startswith("class") and rows[pngs[1]]["label"].startswith("class")
    assert rows[str(bad)]["error"]["code"] == "invalid_input" and rows[str(bad)]["error"]["status"] == 400
    assert rows[missing]["error"]["code"] == "unreadable_file"
    assert "2 of 4 files got no answer" in captured.err


def test_the_table_shows_failures_in_an_error_column(server, pngs, tmp_path, capsys):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"GIF89a but not really")
    assert main(["predict", "--url", server.base_url, pngs[0], str(bad)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["file", "label", "adversarial", "gap", "error"]
    assert out[2].split() == [str(bad), "-", "-", "-", "invalid_input"]


def test_api_key_from_the_flag_or_the_environment(http_store, pngs, capsys, monkeypatch):
    with run_server(settings_for(http_store, model_version="1", api_keys=(KEY,))) as srv:
        monkeypatch.delenv("MIXINFER_CLIENT_API_KEY", raising=False)
        assert main(["predict", "--url", srv.base_url, pngs[0]]) == 1
        assert "HTTP 401 unauthorized" in capsys.readouterr().err
        assert main(["predict", "--url", srv.base_url, "--api-key", KEY, pngs[0]]) == 0
        monkeypatch.setenv("MIXINFER_CLIENT_API_KEY", KEY)
        assert main(["predict", "--url", srv.base_url, pngs[0]]) == 0
        assert main(["predict", "--url", srv.base_url, "--api-key", "wrong-key-0123456789", pngs[0]]) == 1


def test_no_server_fails_every_file(pngs, capsys):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert main(["predict", "--url", f"http://127.0.0.1:{port}", "--json", *pngs[:2]]) == 1
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["error"]["code"] for r in rows] == ["connection_error", "connection_error"]


def test_png_from_examples_through_the_cli_of_the_real_model(capsys):
    """The committed default bundle and the committed examples: the README's example, as printed."""
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    from service.store import list_versions

    if not list_versions(repo / "model_store", "mnist-mixup"):
        pytest.skip("default bundle not present")
    with run_server(settings_for(repo / "model_store", name="mnist-mixup", seed=0)) as srv:
        files = [str(repo / "examples" / n) for n in ("clean_7.png", "adversarial_1_true4.png")]
        assert main(["predict", "--url", srv.base_url, "--json", *files]) == 0
    clean, attacked = (json.loads(line) for line in capsys.readouterr().out.splitlines())
    assert (clean["label"], clean["adversarial"]) == ("7", False)
    assert attacked["adversarial"] is True


def test_a_progress_bar_counts_files_on_a_terminal(server, tmp_path):
    """tqdm draws on stderr when it is a terminal (a pseudo-terminal here), and stays off the table on stdout."""
    import fcntl
    import os
    import pty
    import struct
    import subprocess
    import sys
    import termios

    rng = np.random.default_rng(1)
    files = []
    for i in range(40):
        path = tmp_path / f"d{i}.png"
        path.write_bytes(png_bytes(rng.integers(0, 256, (8, 8), dtype=np.uint8)))
        files.append(str(path))
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a new pty is 0 columns wide
    try:
        done = subprocess.run(
            [sys.executable, "-m", "service.cli", "predict", "--url", server.base_url, "--batch-size", "8", *files],
            stdout=subprocess.PIPE,
            stderr=follower,
            timeout=120,
            check=False,
        )
        os.close(follower)
        follower = -1
        drawn = b""
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the terminal's other end is closed
                break
            if not chunk:
                break
            drawn += chunk
    finally:
        if follower >= 0:
            os.close(follower)
        os.close(leader)
    assert done.returncode == 0
    assert b"40/40" in drawn and b"file" in drawn
    assert b"HTTP Request" not in drawn  # httpx's per-request log lines stay quiet
    assert len(done.stdout.decode().splitlines()) == 41 and b"40/40" not in done.stdout


def test_at_the_label_default_the_table_has_no_gap_column(http_store, pngs, capsys):
    with run_server(settings_for(http_store, model_version="1")) as srv:
        assert main(["predict", "--url", srv.base_url, *pngs[:2]]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["file", "label", "adversarial"]
    assert len(out) == 3

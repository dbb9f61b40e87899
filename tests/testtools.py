"""Test helpers shared across test directories (a uniquely named module: every ``conftest.py`` is imported as
``conftest``, so ``from conftest import ...`` would get whichever one pytest loaded last)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require_tool(name: str) -> str:
    """Path of an external tool; skip locally when missing, fail under CI (where `make test` installs it)."""
    path = shutil.which(name)
    if path is None:
        message = f"required tool {name!r} not found on PATH (`make system-deps` installs it)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return path


def serve_until_exit(env: dict[str, str], timeout_s: float) -> subprocess.CompletedProcess[str]:
    """Run ``python -m service.cli serve`` from the repository root until it exits (the start-up refusals); its
    stdout and stderr come back as text, and a non-zero exit is the caller's to check."""
    return subprocess.run(
        [sys.executable, "-m", "service.cli", "serve"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


def stop_process(proc: subprocess.Popen, timeout_s: float = 15.0, kill_timeout_s: float = 5.0) -> int:
    """SIGTERM a still-running process, SIGKILL it if it has not exited within ``timeout_s``; its exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=kill_timeout_s)
    return int(proc.returncode)

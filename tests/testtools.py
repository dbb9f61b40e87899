"""Test helpers shared across test directories (a uniquely named module: every ``conftest.py`` is imported as
``conftest``, so ``from conftest import ...`` would get whichever one pytest loaded last)."""

from __future__ import annotations

import os
import shutil

import pytest

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

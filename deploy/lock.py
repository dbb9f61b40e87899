"""Write deploy/requirements/{cpu,gpu}.txt: every dependency of each image pinned with its hashes (`make lock`).

Each image installs its lock with ``pip install --require-hashes --no-deps`` in a layer of its own, before the app
wheel (``--no-deps``), so a code or README change rebuilds the app layer only. The locks are resolved by ``uv pip
compile`` for the images' interpreter and platform (CPython 3.12 on Linux x86_64, each base's glibc), wheels only.
Each file starts with the pyproject.toml requirements it was resolved from; tests/deploy/test_deploy_locks.py
fails when they differ from pyproject.toml (run ``make lock`` again). Standard library only, plus uv.
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "deploy" / "requirements"
PYTHON_VERSION = "3.12"  # python:3.12.11-slim-bookworm (cpu) and Ubuntu 24.04's python3 (gpu)
#: image -> (the pyproject extras it installs, the platform of its base image: glibc 2.36 bookworm, 2.39 noble)
IMAGES = {
    "cpu": (("serve", "cpu"), "x86_64-manylinux_2_36"),
    "gpu": (("serve", "gpu"), "x86_64-manylinux_2_39"),
}
INPUTS_HEADER = "# inputs (pyproject.toml):"


def inputs(image: str) -> list[str]:
    """The requirement strings of pyproject.toml the image's lock is resolved from, in file order."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras, _ = IMAGES[image]
    out = list(project["dependencies"])
    for extra in extras:
        out += [r for r in project["optional-dependencies"][extra] if r not in out]
    return out


def lock(image: str) -> str:
    extras, platform = IMAGES[image]
    command = ["uv", "pip", "compile", "pyproject.toml", *(f"--extra={e}" for e in extras)]
    command += ["--generate-hashes", "--only-binary=:all:", f"--python-version={PYTHON_VERSION}"]
    command += [f"--python-platform={platform}", "--no-progress", "--quiet", "--custom-compile-command=make lock"]
    resolved = subprocess.run(
        [sys.executable, "-m", *command], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    header = [f"# the {image} image's dependencies: {' '.join(command)}", INPUTS_HEADER]
    header += [f"#   {r}" for r in inputs(image)]
    return "\n".join(header) + "\n" + resolved


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    for image in IMAGES:
        (OUT / f"{image}.txt").write_text(lock(image))
        sys.stdout.write(f"wrote {OUT / f'{image}.txt'}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

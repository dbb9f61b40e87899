"""The images' locked requirement files (deploy/requirements/{cpu,gpu}.txt, `make lock`) against pyproject.toml:
resolved from exactly the image's requirements, every one pinned to a version its specifier allows, every pin
exact and hashed (the images install them with `pip install --require-hashes`), for the images' Python."""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass

import pytest
from deploy_support import DOCKERFILE, REPO, parse_dockerfile
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

IMAGES = {"cpu": ("serve", "cpu"), "gpu": ("serve", "gpu")}
#: the python3 of the Ubuntu releases an nvidia/cuda base may use
UBUNTU_PYTHON = {"22.04": "3.10", "24.04": "3.12"}
HASH = re.compile(r"--hash=sha256:[0-9a-f]{64}")


@dataclass
class Lock:
    command: str
    inputs: list[str]
    pins: dict[str, str]  # canonical name -> version
    hashes: dict[str, int]  # canonical name -> number of hashes
    raw_pins: list[str]


def parse_lock(text: str) -> Lock:
    lines = text.splitlines()
    command = lines[0]
    start = lines.index("# inputs (pyproject.toml):") + 1
    inputs = []
    for line in lines[start:]:
        if not line.startswith("#   "):
            break
        inputs.append(line[4:])
    logical, buf = [], ""
    for line in lines:
        stripped = line.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        logical.append(buf + stripped)
        buf = ""
    pins, hashes = {}, {}
    for entry in logical:
        spec = entry.split(" --hash", 1)[0].strip()
        m = re.fullmatch(r"([A-Za-z0-9._-]+)==([A-Za-z0-9.+!-]+)", spec)
        assert m, f"not an exact pin: {spec!r}"
        name = canonicalize_name(m.group(1))
        pins[name] = m.group(2)
        hashes[name] = len(HASH.findall(entry))
    return Lock(command, inputs, pins, hashes, logical)


def image_requirements(pyproject: dict, image: str) -> list[str]:
    """What the image installs, from pyproject.toml: the core dependencies and the image's extras."""
    project = pyproject["project"]
    out = list(project["dependencies"])
    for extra in IMAGES[image]:
        out += [r for r in project["optional-dependencies"][extra] if r not in out]
    return out


def stale_reasons(lock: Lock, pyproject: dict, image: str) -> list[str]:
    """Why ``lock`` does not belong to ``pyproject`` (empty: it does)."""
    wanted = image_requirements(pyproject, image)
    reasons = []
    if lock.inputs != wanted:
        reasons.append(f"resolved from {lock.inputs}, pyproject.toml now says {wanted}")
    for text in wanted:
        req = Requirement(text)
        version = lock.pins.get(canonicalize_name(req.name))
        if version is None:
            reasons.append(f"{req.name} is not pinned")
        elif not req.specifier.contains(version, prereleases=True):
            reasons.append(f"{req.name}=={version} does not satisfy {req.specifier}")
    return reasons


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


# ids: a bare "gpu" would mark these as GPU tests (tests/conftest.py skips those without a GPU)
@pytest.fixture(scope="module", params=sorted(IMAGES), ids=lambda image: f"{image}-image")
def lock(request) -> tuple[str, Lock]:
    path = REPO / "deploy" / "requirements" / f"{request.param}.txt"
    assert path.is_file(), f"{path} is missing: run `make lock`"
    return request.param, parse_lock(path.read_text())


def test_lock_matches_pyproject(lock):
    image, parsed = lock
    reasons = stale_reasons(parsed, _pyproject(), image)
    assert not reasons, f"deploy/requirements/{image}.txt is stale, run `make lock`: " + "; ".join(reasons)


def test_a_changed_requirement_makes_the_lock_stale(lock):
    """The check above can fail: a tightened pin that the locked version no longer satisfies, and a loosened one
    that it still satisfies, are both caught."""
    image, parsed = lock
    pyproject = _pyproject()
    serve = pyproject["project"]["optional-dependencies"]["serve"]
    i = next(i for i, r in enumerate(serve) if r.startswith("fastapi"))
    for changed in ("fastapi>=999", "fastapi>=0.1"):
        serve[i] = changed
        assert stale_reasons(parsed, pyproject, image), changed


def test_every_pin_is_exact_and_hashed(lock):
    _, parsed = lock
    assert len(parsed.pins) >= 20, "the lock must hold the whole dependency closure, not only the direct ones"
    assert len(parsed.raw_pins) == len(parsed.pins), "a package is pinned twice"
    unhashed = [name for name, n in parsed.hashes.items() if n == 0]
    assert not unhashed, f"pins without --hash: {unhashed}"


def test_lock_holds_exactly_its_onnxruntime_and_no_torch(lock):
    image, parsed = lock
    ort = sorted(n for n in parsed.pins if n in ("onnxruntime", "onnxruntime-gpu"))
    assert ort == (["onnxruntime"] if image == "cpu" else ["onnxruntime-gpu"])
    assert not [n for n in parsed.pins if n.startswith("torch")]


def test_lock_is_resolved_for_the_images_python(lock):
    image, parsed = lock
    stages = {s.name: s for s in parse_dockerfile(DOCKERFILE.read_text())}
    base = stages[image].base
    if image == "cpu":
        m = re.fullmatch(r"python:(\d+\.\d+)\.\d+-slim-\w+", base)
        assert m, base
        python = m.group(1)
    else:
        m = re.search(r"-ubuntu(\d\d\.\d\d)$", base)
        assert m, base
        python = UBUNTU_PYTHON[m.group(1)]
    assert f"--python-version={python}" in parsed.command, parsed.command
    assert "--python-platform=x86_64-manylinux_" in parsed.command and "--generate-hashes" in parsed.command
    assert "--only-binary=:all:" in parsed.command, "the images install wheels only"

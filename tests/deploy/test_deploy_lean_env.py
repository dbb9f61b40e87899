"""Serving really needs no torch: only `.[serve,cpu]` installed (the Makefile's cached `.venv-serve`, which
`make serve` uses), torch not importable there, and `mixinfer serve` from it answers a prediction."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import pytest
from deploy_support import REPO
from testtools import IN_CI, require_tool, stop_process

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(900)]

SERVE_VENV = REPO / ".venv-serve"


@pytest.fixture(scope="module")
def lean_python() -> Path:
    """`.venv-serve/bin/python`, created with `make .venv-serve/.installed` when absent (needs the package index)."""
    if not (SERVE_VENV / ".installed").is_file():
        make = require_tool("make")
        proc = subprocess.run(
            [make, "-C", str(REPO), ".venv-serve/.installed"],
            capture_output=True,
            text=True,
            timeout=840,
            check=False,
        )
        if proc.returncode != 0:
            message = f"`make .venv-serve/.installed` failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
            if IN_CI:
                pytest.fail(message)
            pytest.skip(message)
    python = SERVE_VENV / "bin" / "python"
    assert python.is_file()
    return python


def test_lean_env_has_no_torch_and_exactly_one_onnxruntime(lean_python: Path):
    torch = subprocess.run([lean_python, "-c", "import torch"], capture_output=True, text=True, timeout=60, check=False)
    assert torch.returncode != 0 and "No module named 'torch'" in torch.stderr
    # the same guard the images run at build time
    check = subprocess.run(
        [lean_python, str(REPO / "deploy" / "check_image_env.py"), "onnxruntime"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert check.returncode == 0, check.stderr


@pytest.mark.parametrize(
    ("args", "extra"),
    [
        (["train", "--dataset", "mnist5k", "--run-dir", "runs/never"], "train"),
        (["evaluate", "--bundle", "model_store/mnist-mixup/1", "--budget", "quick"], "train"),
    ],
)
def test_commands_that_need_torch_say_which_extra_in_the_lean_env(lean_python: Path, args: list[str], extra: str):
    mixinfer = SERVE_VENV / "bin" / "mixinfer"
    done = subprocess.run([str(mixinfer), *args], cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 2, done.stderr
    assert f"needs the '{extra}' extra, missing module 'torch'" in done.stderr
    assert "Traceback" not in done.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _serve_and_predict(
    command: list[str], env: dict[str, str], store: Path, log: Path, then: Callable[[str], None] | None = None
) -> subprocess.Popen:
    """Start ``command`` (``... serve``) on the tiny bundle, wait for readiness, check one prediction and the
    browser page, run ``then(base_url)``; stop it."""
    port = _free_port()
    env = {
        **env,
        "HOME": os.environ.get("HOME", "/tmp"),
        "MIXINFER_HOST": "127.0.0.1",
        "MIXINFER_PORT": str(port),
        "MIXINFER_MODEL_DIR": str(store),
        "MIXINFER_MODEL_NAME": "tiny",
        "MIXINFER_PROVIDERS": "CPUExecutionProvider",
        "MIXINFER_LOG_JSON": "false",
    }
    proc = subprocess.Popen(command, cwd=log.parent, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        ready = False
        while time.monotonic() < deadline and not ready:
            assert proc.poll() is None, f"mixinfer serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
            with contextlib.suppress(httpx.HTTPError):
                ready = httpx.get(f"{base}/v2/health/ready", timeout=2).status_code == 200
            time.sleep(0.2)
        assert ready, f"not ready within 60 s:\n{log.read_text()[-3000:]}"
        image = np.random.default_rng(0).random((1, 8, 8)).round(4).tolist()
        response = httpx.post(
            f"{base}/predict",
            content=json.dumps({"instances": [image, image]}),
            headers={"content-type": "application/json"},
            timeout=30,
        )
        assert response.status_code == 200, response.text
        predictions = response.json()["predictions"]
        assert len(predictions) == 2
        for p in predictions:
            assert p["mode"] in ("pl", "ol")
            assert len(p["probabilities"]) == 3 and sum(p["probabilities"].values()) <= 1.0 + 1e-4  # label detail
        page = httpx.get(f"{base}/", timeout=10)
        assert page.status_code == 200 and '<script src="/ui/app.js"' in page.text
        assert httpx.get(f"{base}/ui/samples/clean_7.png", timeout=10).content.startswith(b"\x89PNG")
        if then is not None:
            then(base)
        # the running server process has not loaded torch
        maps = Path(f"/proc/{proc.pid}/maps")
        if maps.exists():
            assert "libtorch" not in maps.read_text()
    finally:
        stop_process(proc)
    return proc


def test_mixinfer_serve_from_the_lean_env_answers_a_prediction(lean_python: Path, tiny_store: Path):
    mixinfer = SERVE_VENV / "bin" / "mixinfer"
    assert mixinfer.is_file(), "the console script is installed in the lean env"
    path = f"{SERVE_VENV / 'bin'}:{os.environ.get('PATH', '/usr/bin:/bin')}"

    def lean_client_predicts(base: str) -> None:  # the 'client' extra is in the lean env too
        done = subprocess.run(
            [str(mixinfer), "predict", "--url", base, "--json", str(REPO / "examples" / "clean_7.png")],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["model"] == "tiny"

    _serve_and_predict(
        [str(mixinfer), "serve"], {"PATH": path}, tiny_store, tiny_store.parent / "serve.log", lean_client_predicts
    )


def test_the_wheel_the_images_install_serves_without_the_source_tree(lean_python: Path, tiny_store: Path, tmp_path):
    """The Dockerfile installs a wheel, not the repository: build it from a copy of what the image's build context
    holds, unpack it, and serve from it with the lean env's dependencies (the import must come from the wheel)."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "service", src / "service", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = tmp_path.glob("mixinfer-*.whl")
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        zf.extractall(site)
    assert {"service/py.typed", "service/api/routes/predict.py", "service/mi/engine.py"} <= names
    page = {"index.html", "app.js", "style.css", "samples/clean_7.png", "samples/adversarial_1_true4.png"}
    assert {f"service/api/static/{name}" for name in page} <= names
    assert not any(n.startswith(("tests/", "deploy/", "model_store/")) for n in names)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(site)}
    where = subprocess.run(
        [str(lean_python), "-c", "import service; print(service.__file__)"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert where.stdout.strip() == str(site / "service" / "__init__.py"), where.stdout + where.stderr
    _serve_and_predict([str(lean_python), "-m", "service.cli", "serve"], env, tiny_store, tmp_path / "serve.log")

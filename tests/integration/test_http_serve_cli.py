"""`mixinfer serve` as a real process (uvloop + httptools), its start-up refusals, and a torch-free serving path."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from testtools import serve_until_exit

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env_for(store: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MIXINFER_")}
    env |= {
        "MIXINFER_MODEL_DIR": str(store),
        "MIXINFER_MODEL_NAME": "tiny",
        "MIXINFER_PROVIDERS": "CPUExecutionProvider",
        "MIXINFER_INTRA_OP_THREADS": "1",
        "PYTHONPATH": str(REPO),
    }
    return env | extra


def test_serve_runs_uvicorn_on_the_configured_address(http_store):
    port = free_port()
    env = env_for(http_store, MIXINFER_PORT=str(port), MIXINFER_LOG_JSON="true")
    proc = _start_and_wait_ready(env, port)  # raises with the server's output if it never gets ready
    try:
        base = f"http://127.0.0.1:{port}"
        r = httpx.post(f"{base}/predict", json={"instances": [np.zeros((8, 8)).tolist()]}, timeout=10)
        assert r.status_code == 200 and r.json()["version"] == "2"  # highest version by default
        assert "server" not in r.headers  # no server banner
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    # uvicorn shuts down gracefully, then re-raises the SIGTERM it caught
    assert proc.returncode in (0, -15), out
    assert "Application shutdown complete" in out
    lines = [line for line in out.splitlines() if line.startswith("{")]
    access = [line for line in lines if '"route":"/predict"' in line]
    assert access, out
    assert '"branch":["pl"]' in access[0] or '"branch":["ol"]' in access[0]
    assert '"gap":[' in access[0] and '"code":200' in access[0] and "partner" not in out


def test_serve_serves_the_version_its_start_up_checks_verified(tmp_path):
    """A version published between ``mixinfer serve``'s checks and the app's start is not what gets served."""
    from mixserver import run_app, settings_for
    from tinybundle import make_tiny_bundle

    from service.api.cli import build_app

    make_tiny_bundle(tmp_path, version="1", seed=0)
    app, path = build_app(settings_for(tmp_path), exit_on_load_failure=False)
    make_tiny_bundle(tmp_path, version="2", seed=1)  # published after the checks, before uvicorn starts the app
    with run_app(app) as served:
        r = served.client.post("/predict", json={"instances": [np.zeros((8, 8)).tolist()]})
    assert path == tmp_path / "tiny" / "1"
    assert r.status_code == 200 and r.json()["version"] == "1"


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        ({"MIXINFER_MAX_BATCH_IMAGES": "4096"}, "max_batch_images"),
        ({"MIXINFER_ADMIN_KEY": ""}, "admin_key is set but blank"),
        ({"MIXINFER_MODEL_VERSION": "7"}, "7"),
        ({"MIXINFER_MODEL_NAME": "absent"}, "absent"),
        # a typo would leave the server open: refused, naming the closest setting (never echoing the value)
        (
            {"MIXINFER_API_KEY": "typo-key-0123456789"},
            "MIXINFER_API_KEY is not a mixinfer setting; did you mean MIXINFER_API_KEYS?",
        ),
        ({"MIXINFER_ADMINKEY": "typo-key-0123456789"}, "did you mean MIXINFER_ADMIN_KEY?"),
        ({"MIXINFER_API_KEYS_FILE": "/nonexistent/keys"}, "api_keys_file '/nonexistent/keys' cannot be read"),
    ],
)
def test_serve_refuses_to_start_on_bad_settings_or_bundles(http_store, extra, needle):
    env = env_for(http_store, MIXINFER_PORT=str(free_port()), **extra)
    out = serve_until_exit(env, timeout_s=60)
    assert out.returncode == 2, out.stderr
    assert "refusing to start" in out.stderr and needle in out.stderr
    assert "typo-key-0123456789" not in out.stderr


def test_serving_path_never_imports_torch(http_store):
    code = (
        "import sys, asyncio\n"
        "from service.config import Settings\n"
        "from service.api.app import create_app\n"
        "from service.api.runtime import load_model, read_bundle\n"
        f"s = Settings(model_dir={str(http_store)!r}, model_name='tiny', providers=('CPUExecutionProvider',))\n"
        "app = create_app(s)\n"
        "m = load_model(s, read_bundle(s, None), None)\n"
        "import service.api.cli\n"
        "bad = sorted(k for k in sys.modules if k.split('.')[0] == 'torch' or k.startswith(('service.training',"
        " 'service.robustness')))\n"
        "print('BAD', bad)\n"
        "sys.exit(1 if bad else 0)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env=env_for(http_store),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_serve_stops_when_the_backend_cannot_be_created(http_store):
    env = env_for(http_store, MIXINFER_PORT=str(free_port()), MIXINFER_PROVIDERS="NoSuchExecutionProvider")
    out = serve_until_exit(env, timeout_s=60)
    assert out.returncode != 0
    assert "model load failed, stopping the server" in out.stderr and "NoSuchExecutionProvider" in out.stderr


def _start_and_wait_ready(env: dict[str, str], port: int) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "serve"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise AssertionError(f"server did not become ready: {proc.communicate(timeout=10)[0][-2000:]}")


def test_a_real_sigterm_turns_readiness_to_0_while_a_request_is_in_flight(http_store):
    """The signal reaches serving.Server: mixinfer_ready (scraped from the metrics port, which outlives the drain)
    is 0 while a request whose body is still arriving holds the drain open; that request is then answered."""
    import io

    from PIL import Image

    port, metrics_port = free_port(), free_port()
    env = env_for(
        http_store, MIXINFER_PORT=str(port), MIXINFER_METRICS_PORT=str(metrics_port), MIXINFER_LOG_JSON="false"
    )
    proc = _start_and_wait_ready(env, port)
    try:
        buf = io.BytesIO()
        Image.fromarray(np.full((8, 8), 128, np.uint8)).save(buf, "PNG")
        png = buf.getvalue()
        head = f"POST /predict HTTP/1.1\r\nHost: t\r\nContent-Type: image/png\r\nContent-Length: {len(png)}\r\n\r\n"
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(head.encode() + png[:10])  # the request is in flight: its body is not complete

            def ready_gauge() -> float:
                text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).text
                return next(float(ln.split()[1]) for ln in text.splitlines() if ln.startswith("mixinfer_ready "))

            assert ready_gauge() == 1.0
            time.sleep(0.3)
            proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 10
            while ready_gauge() != 0.0:
                assert time.monotonic() < deadline, "mixinfer_ready still 1 after SIGTERM"
                time.sleep(0.05)
            assert proc.poll() is None  # still draining: the request in flight holds it
            sock.sendall(png[10:])
            answer = sock.recv(65536)
        assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        out = proc.communicate(timeout=10)[0]
    assert proc.returncode in (0, -15), out

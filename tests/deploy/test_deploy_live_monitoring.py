"""The dashboard and the alert rules against live data: a real ``mixinfer serve`` on the default bundle, scraped
every second by a real Prometheus loaded with deploy/prometheus/alerts.yml; clean traffic, then PGD traffic made
here with torch against the bundle's own weights, then a burst that overflows the queue (503), then a hot swap to
version 2 (the committed interpolated-AT bundle, re-labelled as version 2 of the same model in a temporary store)
and clean traffic on it. Then EVERY panel query of deploy/grafana/dashboards/mixinfer.json goes through
Prometheus's HTTP API and must return finite data, the flag-rate panel must read higher in the adversarial phase
than in the clean one, and the gap panel must show the two versions apart, each against its own calibration.

GPU panels read NVIDIA DCGM exporter series; no GPU here, so a loopback endpoint serves a fixed exposition in
dcgm-exporter's format (metric and label names as the exporter's default counters emit them). That proves the
queries match that format, not that a real exporter runs.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from deploy_support import (
    ALERTS,
    REPO,
    dashboard,
    dashboard_panels,
    free_port,
    start_prometheus,
    substitute_grafana_variables,
    wait_for,
)
from testtools import IN_CI, require_tool, stop_process

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(180)]

STORE = REPO / "model_store"
MODEL_NAME = "mnist-mixup"
SWAP_SOURCE = "mnist-iat"  # copied in as version 2 of MODEL_NAME: same inputs and classes, its own calibration
ADMIN_KEY = "live-monitoring-admin-key-0123"
GAP_PANEL = "Detection gap vs threshold and calibration"
PHASE_S = 8.0  # clean and adversarial phases; the flag-rate window below must fit inside one phase
WINDOW = "5s"  # $__rate_interval: Grafana's value for a 1 s scrape is max(4 x 1 s, step + 1 s)
IMAGES_PER_REQUEST = 8
N_IMAGES = 48
FLAG_RATE_PANEL = "Adversarial flag rate vs calibrated"

DCGM_EXPOSITION = """\
# HELP DCGM_FI_DEV_GPU_UTIL GPU utilization (in %).
# TYPE DCGM_FI_DEV_GPU_UTIL gauge
DCGM_FI_DEV_GPU_UTIL{gpu="0",UUID="GPU-5f2c0d4e-0000-0000-0000-000000000000",device="nvidia0",\
modelName="NVIDIA H100 80GB HBM3",Hostname="gpu-host",DCGM_FI_DRIVER_VERSION="580.65.06"} 37
# HELP DCGM_FI_DEV_FB_FREE Framebuffer memory free (in MiB).
# TYPE DCGM_FI_DEV_FB_FREE gauge
DCGM_FI_DEV_FB_FREE{gpu="0",UUID="GPU-5f2c0d4e-0000-0000-0000-000000000000",device="nvidia0",\
modelName="NVIDIA H100 80GB HBM3",Hostname="gpu-host",DCGM_FI_DRIVER_VERSION="580.65.06"} 79011
# HELP DCGM_FI_DEV_FB_USED Framebuffer memory used (in MiB).
# TYPE DCGM_FI_DEV_FB_USED gauge
DCGM_FI_DEV_FB_USED{gpu="0",UUID="GPU-5f2c0d4e-0000-0000-0000-000000000000",device="nvidia0",\
modelName="NVIDIA H100 80GB HBM3",Hostname="gpu-host",DCGM_FI_DRIVER_VERSION="580.65.06"} 2042
"""


# --- fixtures ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bundle_dir() -> Path:
    from service.store import resolve_bundle

    if not (STORE / MODEL_NAME).is_dir():
        message = f"default bundle {STORE / MODEL_NAME} missing (`make bundle` builds it)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return resolve_bundle(STORE, MODEL_NAME)


@pytest.fixture(scope="module")
def images(bundle_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """Clean test-split images of the bundle (never pool or training images) and PGD versions of them."""
    torch = pytest.importorskip("torch")
    from service.store import load_bundle
    from service.training.datasets import load_dataset
    from service.training.models import load_bundle_model

    bundle = load_bundle(bundle_dir, require_weights=True)
    dataset = load_dataset(bundle.manifest.dataset.name)
    test = bundle.splits["test"][:N_IMAGES]
    clean = dataset.images[test].astype(np.float32) / 255.0
    labels = dataset.labels[test]
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = load_bundle_model(bundle)
    x = torch.from_numpy(clean)
    y = torch.from_numpy(labels)
    # L-inf PGD on the base model (SPEC 9.1, MNIST budget): eps 0.3, step 0.01, 40 steps, one random start
    eps, step = 0.3, 0.01
    adv = (x + torch.empty_like(x).uniform_(-eps, eps)).clamp(0.0, 1.0)
    for _ in range(40):
        adv.requires_grad_(True)
        loss = torch.nn.functional.cross_entropy(model(adv), y)
        (grad,) = torch.autograd.grad(loss, adv)
        with torch.no_grad():
            adv = torch.min(torch.max(adv + step * grad.sign(), x - eps), x + eps).clamp(0.0, 1.0)
    with torch.no_grad():
        clean_acc = float((model(x).argmax(1) == y).float().mean())
        adv_acc = float((model(adv).argmax(1) == y).float().mean())
    assert clean_acc >= 0.8, f"the default bundle's base model is only {clean_acc:.0%} accurate on clean test images"
    assert adv_acc <= 0.3, f"PGD left the base model {adv_acc:.0%} accurate: not adversarial traffic"
    return clean, adv.detach().numpy().astype(np.float32)


@dataclass
class Stack:
    server: str
    prometheus: str
    server_port: int
    log: Path
    store: Path


def _two_version_store(root: Path) -> Path:
    """MODEL_NAME version 1 (the default bundle) and version 2 (SWAP_SOURCE's files under MODEL_NAME), copied."""
    shutil.copytree(STORE / MODEL_NAME / "1", root / MODEL_NAME / "1")
    shutil.copytree(STORE / SWAP_SOURCE / "1", root / MODEL_NAME / "2")
    manifest_path = root / MODEL_NAME / "2" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest.update(name=MODEL_NAME, version="2")
    manifest_path.write_text(json.dumps(manifest, indent=2))
    return root


@pytest.fixture(scope="module")
def stack(bundle_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    prometheus_bin = require_tool("prometheus")
    tmp = tmp_path_factory.mktemp("live")
    if not (STORE / SWAP_SOURCE / "1").is_dir():
        pytest.fail(f"{STORE / SWAP_SOURCE} is missing (`make bundle-iat` builds it)")
    store = _two_version_store(tmp / "store")
    server_port = free_port()

    dcgm = ThreadingHTTPServer(("127.0.0.1", 0), _DcgmHandler)
    threading.Thread(target=dcgm.serve_forever, daemon=True).start()

    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "MIXINFER_HOST": "127.0.0.1",
        "MIXINFER_PORT": str(server_port),
        "MIXINFER_MODEL_DIR": str(store),
        "MIXINFER_MODEL_NAME": MODEL_NAME,
        "MIXINFER_MODEL_VERSION": "1",
        "MIXINFER_ADMIN_KEY": ADMIN_KEY,
        "MIXINFER_PROVIDERS": "CPUExecutionProvider",
        "MIXINFER_INTRA_OP_THREADS": "1",
        "MIXINFER_MAX_BATCH_IMAGES": "16",
        "MIXINFER_MAX_QUEUE_IMAGES": "64",
        "MIXINFER_MAX_IMAGES_PER_REQUEST": "64",
        "MIXINFER_LOG_JSON": "false",
    }
    for key in ("MIXINFER_API_KEYS", "MIXINFER_RATE_LIMIT_PER_KEY", "MIXINFER_SEED"):
        env.pop(key, None)
    server_log = tmp / "server.log"
    server = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "serve"],
        cwd=tmp,
        env=env,
        stdout=server_log.open("wb"),
        stderr=subprocess.STDOUT,
    )

    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(ALERTS)],
        "scrape_configs": [
            {"job_name": "mixinfer", "static_configs": [{"targets": [f"127.0.0.1:{server_port}"]}]},
            {"job_name": "dcgm", "static_configs": [{"targets": [f"127.0.0.1:{dcgm.server_address[1]}"]}]},
        ],
    }
    prometheus, prometheus_url = start_prometheus(prometheus_bin, tmp, config)
    stack = Stack(f"http://127.0.0.1:{server_port}", prometheus_url, server_port, server_log, store)
    try:
        wait_for(
            "server ready",
            lambda: httpx.get(f"{stack.server}/v2/health/ready", timeout=2).status_code == 200,
            90,
            server,
            server_log,
        )
        wait_for("mixinfer scraped", lambda: _instant(stack, 'up{job="mixinfer"}') == [1.0], 20, prometheus)
        yield stack
    finally:
        stop_process(server)
        stop_process(prometheus)
        dcgm.shutdown()


class _DcgmHandler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = DCGM_EXPOSITION.encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        return


# --- Prometheus API --------------------------------------------------------------------------------------------
def _api(stack: Stack, path: str, params: dict[str, str | float]) -> dict:
    response = httpx.get(f"{stack.prometheus}/api/v1/{path}", params=params, timeout=10)
    body = response.json()
    assert response.status_code == 200 and body["status"] == "success", body
    return body["data"]


def _rfc3339(ts: str) -> float:
    """Seconds since the epoch of Prometheus's UTC timestamps (nanosecond fractions, 'Z')."""
    m = re.fullmatch(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?Z", ts)
    assert m, f"unexpected timestamp {ts!r}"
    whole = datetime.strptime(m.group(1), "%Y-%m-%dT%H:%M:%S").replace(tzinfo=UTC).timestamp()
    return whole + float(m.group(2) or 0.0)


def _instant(stack: Stack, expr: str, at: float | None = None) -> list[float]:
    params: dict[str, str | float] = {"query": expr}
    if at is not None:
        params["time"] = at
    return [float(r["value"][1]) for r in _api(stack, "query", params)["result"]]


# --- traffic -----------------------------------------------------------------------------------------------------
def _predict(client: httpx.Client, batch: np.ndarray) -> httpx.Response:
    body = {"instances": np.round(batch, 5).tolist()}
    return client.post("/predict", content=json.dumps(body), headers={"content-type": "application/json"})


def _phase(stack: Stack, images: np.ndarray, seconds: float) -> list[dict]:
    """Send ``images`` in requests of IMAGES_PER_REQUEST, round robin, for ``seconds``; return the predictions, each
    with the ``version`` that answered it."""
    out: list[dict] = []
    deadline = time.monotonic() + seconds
    i = 0
    with httpx.Client(base_url=stack.server, timeout=30) as client:
        while time.monotonic() < deadline:
            start = (i * IMAGES_PER_REQUEST) % len(images)
            response = _predict(client, images[start : start + IMAGES_PER_REQUEST])
            assert response.status_code == 200, response.text
            body = response.json()
            out.extend({**p, "version": body["version"]} for p in body["predictions"])
            i += 1
    return out


def _overflow(stack: Stack, images: np.ndarray) -> list[int]:
    """Concurrent 64-image requests against a 64-image queue: all but the first few must be refused with 503."""
    batch = np.concatenate([images] * (64 // len(images) + 1))[:64]

    def one(_: int) -> int:
        with httpx.Client(base_url=stack.server, timeout=30) as client:
            return _predict(client, batch).status_code

    codes: list[int] = []
    for _ in range(3):  # bounded: a burst on a loaded machine may fit by luck
        with ThreadPoolExecutor(max_workers=8) as pool:
            codes += list(pool.map(one, range(8)))
        if 503 in codes:
            break
    return codes


def _swap(stack: Stack, version: str) -> dict:
    response = httpx.post(
        f"{stack.server}/v2/repository/models/{MODEL_NAME}/load",
        json={"parameters": {"version": version}},
        headers={"authorization": f"Bearer {ADMIN_KEY}"},
        timeout=120,
    )
    assert response.status_code == 200, response.text
    return response.json()


@dataclass
class Run:
    start: float
    clean_end: float
    adv_end: float
    swapped: float
    end: float
    clean: list[dict]
    adversarial: list[dict]
    codes: list[int]
    after_swap: list[dict]


@pytest.fixture(scope="module")
def run(stack: Stack, images: tuple[np.ndarray, np.ndarray]) -> Run:
    clean, adv = images
    start = time.time()
    clean_predictions = _phase(stack, clean, PHASE_S)
    clean_end = time.time()
    adversarial_predictions = _phase(stack, adv, PHASE_S)
    adv_end = time.time()
    codes = _overflow(stack, clean)
    time.sleep(2.0)  # nothing in flight when the swap starts: every answer before it is version 1's
    assert _swap(stack, "2") == {"name": MODEL_NAME, "version": "2", "previous_version": "1"}
    swapped = time.time()
    after_swap = _phase(stack, clean, PHASE_S)
    end = time.time()
    time.sleep(3.0)  # two more scrapes and rule evaluations
    return Run(start, clean_end, adv_end, swapped, end, clean_predictions, adversarial_predictions, codes, after_swap)


# --- tests -------------------------------------------------------------------------------------------------------
def test_traffic_was_clean_then_adversarial_then_overloaded(run: Run):
    clean_flags = np.mean([p["adversarial"] for p in run.clean])
    adv_flags = np.mean([p["adversarial"] for p in run.adversarial])
    assert len(run.clean) >= 4 * IMAGES_PER_REQUEST and len(run.adversarial) >= 4 * IMAGES_PER_REQUEST
    assert adv_flags > clean_flags, f"server flagged {adv_flags:.0%} of PGD inputs vs {clean_flags:.0%} of clean ones"
    assert 503 in run.codes, f"no 503 from a burst over the queue: {run.codes}"
    assert set(run.codes) <= {200, 503}, run.codes
    assert {p["version"] for p in run.clean + run.adversarial} == {"1"}
    assert {p["version"] for p in run.after_swap} == {"2"} and len(run.after_swap) >= 4 * IMAGES_PER_REQUEST


def test_every_dashboard_panel_query_returns_data(stack: Stack, run: Run):
    """Each query, as Grafana would send it, over the test's time range: non-empty, with finite values."""
    end = time.time()
    range_ = f"{math.ceil(end - run.start) + 5}s"
    empty: list[str] = []
    for panel in dashboard_panels():
        for target in panel["targets"]:
            expr = substitute_grafana_variables(target["expr"], rate_interval=WINDOW, range_=range_)
            if target.get("instant"):
                values = _instant(stack, expr, at=end)
            else:
                data = _api(stack, "query_range", {"query": expr, "start": run.start, "end": end, "step": 1})
                values = [float(v) for series in data["result"] for _, v in series["values"]]
            if not any(math.isfinite(v) for v in values):
                empty.append(f"{panel['title']} / {target['refId']}: {expr}")
    assert not empty, "panel queries without data:\n" + "\n".join(empty)


def test_instance_variable_lists_the_live_server(stack: Stack):
    """The dashboard's `instance` variable (label_values over mixinfer_build_info) finds the scraped server."""
    (variable,) = [v for v in dashboard()["templating"]["list"] if v["name"] == "instance"]
    match = variable["definition"].removeprefix("label_values(").rsplit(",", 1)[0]
    response = httpx.get(
        f"{stack.prometheus}/api/v1/label/instance/values", params={"match[]": match}, timeout=10
    ).json()
    assert response["data"] == [f"127.0.0.1:{stack.server_port}"]


def test_flag_rate_panel_reads_higher_under_attack(stack: Stack, run: Run):
    (panel,) = [p for p in dashboard_panels() if p["title"] == FLAG_RATE_PANEL]
    live, calibrated = (substitute_grafana_variables(t["expr"], rate_interval=WINDOW) for t in panel["targets"])
    # one window inside each phase: [clean_end - 5 s, clean_end] and [adv_end - 5 s, adv_end]
    (clean_rate,) = _instant(stack, live, at=run.clean_end - 0.5)
    (adv_rate,) = _instant(stack, live, at=run.adv_end - 0.5)
    (calibrated_rate,) = _instant(stack, calibrated, at=run.adv_end)
    print(f"flag-rate panel: clean {clean_rate:.3f}, adversarial {adv_rate:.3f}, calibrated {calibrated_rate:.3f}")
    assert adv_rate > clean_rate, f"flag-rate panel: {adv_rate:.3f} under attack vs {clean_rate:.3f} clean"
    assert 0.0 <= calibrated_rate <= 1.0


def test_gap_panel_shows_the_versions_apart_across_the_hot_swap(stack: Stack, run: Run):
    """Each version has its own live-gap and calibration lines: version 1's live gap only up to the swap, version
    2's only after it, each calibration line at its own bundle's quantiles; and once version 1 went idle the server
    dropped its series (Prometheus no longer has a current sample of them)."""
    (panel,) = [p for p in dashboard_panels() if p["title"] == GAP_PANEL]
    live, _, calibrated, _ = (substitute_grafana_variables(t["expr"], rate_interval=WINDOW) for t in panel["targets"])
    data = _api(stack, "query_range", {"query": live, "start": run.start, "end": run.end, "step": 1})
    finite = {
        s["metric"]["version"]: [float(t) for t, v in s["values"] if math.isfinite(float(v))] for s in data["result"]
    }
    assert set(finite) == {"1", "2"}, f"gap panel series by version: {sorted(finite)}"
    margin = 2.0  # a scrape (1 s) and a step of the range query
    assert finite["1"] and max(finite["1"]) <= run.swapped + float(WINDOW.rstrip("s")) + margin, "v1 after the swap"
    assert finite["2"] and min(finite["2"]) >= run.swapped - margin, "version 2's gap line starts before the swap"
    quantiles = {
        version: json.loads((stack.store / MODEL_NAME / version / "manifest.json").read_text())["calibration"][
            "gap_quantiles"
        ]
        for version in ("1", "2")
    }
    assert quantiles["1"] != quantiles["2"]
    for version, at in (("1", run.adv_end), ("2", run.end)):
        got = {
            r["metric"]["q"]: float(r["value"][1])
            for r in _api(stack, "query", {"query": calibrated, "time": at})["result"]
            if r["metric"]["version"] == version
        }
        assert got == pytest.approx({q: quantiles[version][q] for q in got}) and set(got) == {"0.05", "0.5", "0.95"}
    # version 1 answered nothing after the swap: two scrapes later its series are gone from the server
    assert _instant(stack, 'mixinfer_detection_gap_count{job="mixinfer",version="1"}', at=run.end + 2.5) == []
    assert _instant(stack, 'mixinfer_detection_gap_count{job="mixinfer",version="2"}', at=run.end + 2.5) == [
        float(len(run.after_swap))
    ]


def test_alert_rules_load_and_evaluate_without_errors_on_live_series(stack: Stack, run: Run):
    groups = _api(stack, "rules", {})["groups"]
    rules = [r for g in groups for r in g["rules"]]
    names = {r["name"] for r in rules}
    expected = {r["alert"] for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]}
    assert names == expected
    for rule in rules:
        # evaluated (at 1 s) after the traffic started, on the live series, without an error such as a
        # many-to-many vector match that synthetic unit-test series would not reveal
        assert _rfc3339(rule["lastEvaluation"]) > run.start, f"{rule['name']} not evaluated since {run.start}"
        assert rule["health"] == "ok", f"{rule['name']}: {rule.get('lastError')}"


def test_container_healthcheck_script_against_the_live_server(stack: Stack):
    script = REPO / "deploy" / "healthcheck.py"
    env = {**os.environ, "MIXINFER_PORT": str(stack.server_port)}
    ok = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=30, check=False)
    assert ok.returncode == 0, ok.stderr
    env["MIXINFER_PORT"] = str(free_port())
    down = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=30, check=False
    )
    assert down.returncode == 1 and "unreachable" in down.stderr


def test_query_watch_panels_show_the_client_that_resends_its_images(stack: Stack, run: Run):
    """The traffic above resends the same 48 images in a loop, as a client averaging the server's randomness
    does: beyond MIXINFER_QUERY_WATCH_RESENDS resends each is a hit, so by the end of the clean phase the hits
    panel shows client hits, the suspect panel one client, and no image was refused (policy observe)."""
    panels = {p["title"]: p for p in dashboard_panels()}
    hits_expr = substitute_grafana_variables(panels["Near-copy hits per second"]["targets"][0]["expr"], WINDOW)
    by_scope = {
        r["metric"]["scope"]: float(r["value"][1])
        for r in _api(stack, "query", {"query": hits_expr, "time": run.clean_end - 0.5})["result"]
    }
    assert by_scope["client"] > 0, by_scope
    (suspects,) = _instant(
        stack, substitute_grafana_variables(panels["Suspect clients"]["targets"][0]["expr"]), at=run.clean_end
    )
    assert suspects == 1
    refused_expr = substitute_grafana_variables(panels["Refused by the query watch"]["targets"][0]["expr"], WINDOW)
    assert all(v == 0 for v in _instant(stack, refused_expr, at=run.end))
    remembered, capacity = (
        _instant(stack, substitute_grafana_variables(t["expr"]), at=run.end)[0]
        for t in panels["Remembered queries vs capacity"]["targets"]
    )
    assert 0 < remembered <= capacity

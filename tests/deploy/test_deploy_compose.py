"""Compose files: valid against the Compose Specification schema (what `docker compose` v2 checks) and for Debian's
docker-compose v1 with no variables set, and structurally what a GPU host (docker-compose.yml) and a CPU host
(deploy/compose.cpu.yml) need. Docker itself cannot run here."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml
from deploy_support import COMPOSE_CPU, COMPOSE_FILES, COMPOSE_GPU, REPO, Stage, load_yaml, parse_dockerfile
from testtools import require_tool

from service.config import Settings

COMPOSE_SCHEMA = Path(__file__).parent / "schemas" / "compose-spec.json"

IMAGE_TAG = re.compile(r"^[\w./-]+:(v?\d+\.\d+\.\d+[\w.-]*)$")
SERVICES = {
    COMPOSE_GPU: {"mixinfer", "prometheus", "grafana", "dcgm-exporter"},
    COMPOSE_CPU: {"mixinfer", "prometheus", "grafana"},
}
HEALTHCHECKED = ("mixinfer", "prometheus", "grafana")


def _clean_env() -> dict[str, str]:
    """No MIXINFER_*, GRAFANA_* or other settings: the files must work with nothing set."""
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/tmp")}


def _compose(path: Path, env_file: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Debian's docker-compose on one file; ``env_file`` replaces a `.env` the developer may have."""
    return subprocess.run(
        [require_tool("docker-compose"), "--env-file", str(env_file), "-f", str(path), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=_clean_env(),
        check=False,
    )


@pytest.fixture(scope="module")
def empty_env_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("compose") / "empty.env"
    path.write_text("")
    return path


@pytest.fixture(scope="module", params=COMPOSE_FILES, ids=lambda p: p.name)
def compose(request, empty_env_file) -> tuple[Path, dict]:
    proc = _compose(request.param, empty_env_file, "config")
    assert proc.returncode == 0, f"docker-compose config failed for {request.param}:\n{proc.stderr}"
    assert "WARNING" not in proc.stderr, proc.stderr
    return request.param, yaml.safe_load(proc.stdout)


def test_compose_config_quiet_passes_with_no_variables_set(compose, empty_env_file):
    path, _ = compose
    proc = _compose(path, empty_env_file, "config", "-q")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""


def test_compose_validator_really_rejects_a_broken_file(tmp_path, empty_env_file):
    """`config -q` is a real check: the same file with a typo in a key fails."""
    broken = load_yaml(COMPOSE_CPU)
    broken["services"]["mixinfer"]["healthcheck"]["intervall"] = "10s"
    path = tmp_path / "compose.yml"
    path.write_text(yaml.safe_dump(broken))
    proc = _compose(path, empty_env_file, "config", "-q")
    assert proc.returncode != 0
    assert "intervall" in proc.stderr


def test_services_are_the_expected_ones(compose):
    path, config = compose
    assert set(config["services"]) == SERVICES[path]


def test_gpu_file_reserves_one_nvidia_gpu_and_cpu_file_reserves_none(compose):
    path, config = compose
    server = config["services"]["mixinfer"]
    devices = server.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
    if path == COMPOSE_GPU:
        assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
        assert server["build"]["target"] == "gpu"
        assert "CUDAExecutionProvider" in server["environment"]["MIXINFER_PROVIDERS"]
    else:
        assert devices == []
        assert server["build"]["target"] == "cpu"
        assert server["environment"]["MIXINFER_PROVIDERS"] == "CPUExecutionProvider"
        assert "dcgm-exporter" not in config["services"]


def test_build_targets_are_stages_of_the_dockerfile_and_context_is_the_repository(compose):
    _, config = compose
    stages: list[Stage] = parse_dockerfile((REPO / "Dockerfile").read_text())
    build = config["services"]["mixinfer"]["build"]
    assert Path(build["context"]) == REPO
    assert build["target"] in {s.name for s in stages}


def test_healthchecks_and_depends_on_service_healthy(compose):
    _, config = compose
    services = config["services"]
    for name in HEALTHCHECKED:
        check = services[name].get("healthcheck")
        assert check and check["test"][0] in ("CMD", "CMD-SHELL"), f"{name} has no healthcheck"
        assert "start_period" in check
    assert "/opt/mixinfer/healthcheck.py" in services["mixinfer"]["healthcheck"]["test"]
    assert services["grafana"]["depends_on"] == {"prometheus": {"condition": "service_healthy"}}


def test_every_image_is_pinned(compose):
    _, config = compose
    for name, service in config["services"].items():
        image = service["image"]
        assert IMAGE_TAG.match(image), f"{name}: image {image!r} is not pinned to an exact version"
        assert not image.endswith(":latest")


def test_every_bind_mount_exists_and_the_store_is_read_only(compose):
    _, config = compose
    named = set(config.get("volumes", {}))
    for name, service in config["services"].items():
        for volume in service.get("volumes", []):
            source, _target, *mode = volume.split(":")
            if source in named:
                continue
            assert Path(source).is_absolute() and Path(source).exists(), f"{name}: mounted path {source} is missing"
            assert mode == ["ro"], f"{name}: bind mount {source} must be read-only"
    store = [v for v in config["services"]["mixinfer"]["volumes"] if v.split(":")[1] == "/models"]
    assert store == [f"{REPO / 'model_store'}:/models:ro"]
    assert config["services"]["mixinfer"]["environment"]["MIXINFER_MODEL_DIR"] == "/models"
    assert {"prometheus-data", "grafana-data"} <= named


def test_prometheus_loads_the_right_config_with_retention(compose):
    path, config = compose
    prometheus = config["services"]["prometheus"]
    command = prometheus["command"]
    expected = "prometheus.yml" if path == COMPOSE_GPU else "prometheus.cpu.yml"
    assert f"--config.file=/etc/prometheus/{expected}" in command
    assert any(re.fullmatch(r"--storage\.tsdb\.retention\.time=\d+[dhw]", c) for c in command), command
    (mount,) = [v for v in prometheus["volumes"] if v.split(":")[1] == "/etc/prometheus"]
    assert (Path(mount.split(":")[0]) / expected).is_file()
    assert (Path(mount.split(":")[0]) / "alerts.yml").is_file()


def test_grafana_is_provisioned_anonymous_viewer_and_admin_password_from_env(compose):
    _, config = compose
    grafana = config["services"]["grafana"]
    env = grafana["environment"]
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    assert env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    mounts = {v.split(":")[1]: Path(v.split(":")[0]) for v in grafana["volumes"]}
    assert (mounts["/etc/grafana/provisioning"] / "datasources" / "prometheus.yml").is_file()
    assert (mounts["/etc/grafana/dashboards"] / "mixinfer.json").is_file()
    assert env["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"] == "/etc/grafana/dashboards/mixinfer.json"
    raw = load_yaml(COMPOSE_GPU)["services"]["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD"]
    assert raw.startswith("${GRAFANA_ADMIN_PASSWORD"), "the admin password comes from .env (or the environment)"


def test_admin_password_and_settings_are_taken_from_an_env_file(tmp_path):
    """The optional .env really feeds the files (docker-compose reads it; here passed explicitly)."""
    env_file = tmp_path / ".env"
    env_file.write_text(
        "GRAFANA_ADMIN_PASSWORD=s3cret-from-env\nMIXINFER_MODEL_NAME=cifar10-mixup\nMIXINFER_LATENCY_P99_TARGET_S=0.25\n"
    )
    for path in COMPOSE_FILES:
        proc = _compose(path, env_file, "config")
        assert proc.returncode == 0, proc.stderr
        config = yaml.safe_load(proc.stdout)
        assert config["services"]["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD"] == "s3cret-from-env"
        assert config["services"]["mixinfer"]["environment"]["MIXINFER_MODEL_NAME"] == "cifar10-mixup"
        assert config["services"]["mixinfer"]["environment"]["MIXINFER_LATENCY_P99_TARGET_S"] == "0.25"


def test_server_environment_holds_no_empty_values(compose):
    """The server refuses empty settings (e.g. MIXINFER_API_KEYS=''), so no default may expand to ''."""
    _, config = compose
    for key, value in config["services"]["mixinfer"]["environment"].items():
        assert value not in ("", None), f"{key} is empty with no variables set"


# --- Compose Specification (docker compose v2) -------------------------------------------------------------------
@pytest.fixture(scope="module")
def compose_validator() -> jsonschema.Draft7Validator:
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def test_schema_copy_is_the_shared_one_with_its_provenance():
    readme = (COMPOSE_SCHEMA.parent / "README.md").read_text()
    assert "compose-spec/compose-spec `schema/compose-spec.json` @ 170098ba07d9f53c383a41bfd4c5166b0a4529a6" in readme
    assert json.loads(COMPOSE_SCHEMA.read_text())["title"] == "Compose Specification"


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_compose_file_is_valid_against_the_compose_specification(path, compose_validator):
    errors = [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in compose_validator.iter_errors(load_yaml(path))
    ]
    assert not errors, "\n".join(errors)


def test_compose_specification_really_rejects_a_broken_file(compose_validator):
    broken = load_yaml(COMPOSE_CPU)
    broken["services"]["mixinfer"]["healthcheck"]["intervall"] = "10s"
    broken["services"]["mixinfer"]["stop_grace_period"] = 30
    messages = [e.message for e in compose_validator.iter_errors(broken)]
    assert any("intervall" in m for m in messages), messages
    assert any("30 is not of type 'string'" in m for m in messages), messages


# --- stop grace period --------------------------------------------------------------------------------------------
def _seconds(duration: str) -> float:
    """Compose durations: ``1m30s``, ``30s``, ``500ms``, ``1h``."""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, f"not a compose duration: {duration!r}"
    return sum(float(n) * units[u] for n, u in parts)


def test_stop_grace_period_outlasts_the_servers_drain(compose):
    """`docker compose stop` sends SIGTERM, then SIGKILL after stop_grace_period: the server's drain (requests in
    flight finish within MIXINFER_REQUEST_TIMEOUT_S) must end first, with time to spare for shutting down."""
    _, config = compose
    server = config["services"]["mixinfer"]
    timeout_s = float(server["environment"]["MIXINFER_REQUEST_TIMEOUT_S"])
    drain_s = Settings(request_timeout_s=timeout_s).drain_s
    grace_s = _seconds(server["stop_grace_period"])
    assert drain_s == 10, f"the files' default MIXINFER_REQUEST_TIMEOUT_S gives a {drain_s} s drain"
    assert grace_s >= drain_s + 10, f"stop_grace_period {grace_s} s leaves too little after a {drain_s} s drain"


def test_compose_duration_parser():
    assert _seconds("1m30s") == 90 and _seconds("30s") == 30 and _seconds("500ms") == 0.5
    with pytest.raises(AssertionError):
        _seconds("30")

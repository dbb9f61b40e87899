"""Helpers of the deploy tests: repository paths, Dockerfile parsing, .dockerignore matching, dashboard queries."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
COMPOSE_GPU = REPO / "docker-compose.yml"
COMPOSE_CPU = REPO / "deploy" / "compose.cpu.yml"
COMPOSE_FILES = (COMPOSE_GPU, COMPOSE_CPU)
PROMETHEUS_DIR = REPO / "deploy" / "prometheus"
PROMETHEUS_CONFIGS = (PROMETHEUS_DIR / "prometheus.yml", PROMETHEUS_DIR / "prometheus.cpu.yml")
ALERTS = PROMETHEUS_DIR / "alerts.yml"
ALERT_TESTS = REPO / "tests" / "deploy" / "rules" / "alerts_test.yml"
GRAFANA_DIR = REPO / "deploy" / "grafana"
DATASOURCES = GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD_PROVIDERS = GRAFANA_DIR / "provisioning" / "dashboards" / "mixinfer.yml"
DASHBOARD = GRAFANA_DIR / "dashboards" / "mixinfer.json"
ARCHITECTURE = REPO / "docs" / "architecture.md"


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


# --- Dockerfile ------------------------------------------------------------------------------------------------
@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def args(self, keyword: str) -> list[str]:
        return [a for k, a in self.instructions if k == keyword]


def parse_dockerfile(text: str) -> list[Stage]:
    """Stages in order, each with its (KEYWORD, arguments) instructions; continuation lines joined."""
    logical: list[str] = []
    buf = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):  # comment inside a continued instruction
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        logical.append(buf + line)
        buf = ""
    stages: list[Stage] = []
    for line in logical:
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            m = re.fullmatch(r"(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?", rest.strip(), flags=re.IGNORECASE)
            assert m, f"cannot parse FROM {rest!r}"
            stages.append(Stage(name=m.group(2) or str(len(stages)), base=m.group(1)))
        elif stages:
            stages[-1].instructions.append((keyword, rest.strip()))
    return stages


# --- .dockerignore -----------------------------------------------------------------------------------------------
def _pattern_regex(pattern: str) -> re.Pattern[str]:
    out = ""
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
            continue
        if pattern.startswith("**", i):
            out += ".*"
            i += 2
            continue
        if c == "[":  # character class, copied through
            end = pattern.index("]", i)
            out += pattern[i : end + 1]
            i = end + 1
            continue
        out += {"*": "[^/]*", "?": "[^/]"}.get(c, re.escape(c))
        i += 1
    # a pattern that matches a directory also excludes everything below it
    return re.compile(out + "(?:/.*)?")


def dockerignore_excludes(rel_path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins; ``!`` re-includes."""
    excluded = False
    for raw in patterns:
        negate = raw.startswith("!")
        pattern = raw[1:] if negate else raw
        pattern = pattern.strip().strip("/")
        if pattern.startswith("./"):
            pattern = pattern[2:]
        if _pattern_regex(pattern).fullmatch(rel_path):
            excluded = not negate
    return excluded


def dockerignore_patterns() -> list[str]:
    lines = (line.strip() for line in DOCKERIGNORE.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


# --- dashboard -----------------------------------------------------------------------------------------------
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def dashboard_panels() -> list[dict[str, Any]]:
    """Every non-row panel, including panels nested in collapsed rows."""
    out: list[dict[str, Any]] = []
    for panel in dashboard()["panels"]:
        if panel["type"] == "row":
            out.extend(panel.get("panels", []))
        else:
            out.append(panel)
    return out


def panel_queries() -> list[tuple[str, str, str]]:
    """(panel title, refId, expr) of every query of every panel."""
    return [(p["title"], t["refId"], t["expr"]) for p in dashboard_panels() for t in p.get("targets", [])]


def substitute_grafana_variables(expr: str, rate_interval: str = "5s", range_: str = "5m") -> str:
    """What Grafana sends to Prometheus with the `instance` variable on All."""
    out = expr.replace("$__rate_interval", rate_interval).replace("$__range", range_).replace("$__interval", "1s")
    out = out.replace("${instance}", "$instance").replace("$instance", ".*")
    assert "$" not in out, f"unsubstituted Grafana variable in {out!r}"
    return out


def architecture_metric_names() -> set[str]:
    """The metric names fixed in docs/architecture.md (the contract with service/metrics.py)."""
    text = ARCHITECTURE.read_text()
    section = text.split("## Metric names", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"\b(mixinfer_[a-z0-9_]+)", section))


# --- live processes (the live-monitoring and the replica tests) ---------------------------------------------------
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(what: str, ok, timeout_s: float, proc: subprocess.Popen | None = None, log: Path | None = None) -> None:
    """Poll ``ok()`` until true; fail with the log's tail if ``proc`` exits or the time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text()[-4000:] if log else ""
            pytest.fail(f"{what}: process exited with {proc.returncode}\n{tail}")
        try:
            if ok():
                return
        except (httpx.HTTPError, OSError):
            pass
        time.sleep(0.2)
    tail = log.read_text()[-4000:] if log else ""
    pytest.fail(f"{what}: not reached within {timeout_s} s\n{tail}")


def start_prometheus(binary: str, tmp: Path, config: dict[str, Any]) -> tuple[subprocess.Popen, str]:
    """A real Prometheus on a free loopback port with ``config``, storing in ``tmp``; (process, base URL) once it
    answers ``/-/ready``."""
    port = free_port()
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    log = tmp / "prometheus.log"
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={tmp / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--storage.tsdb.retention.time=1h",
        ],
        cwd=tmp,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    wait_for("prometheus ready", lambda: httpx.get(f"{url}/-/ready", timeout=2).status_code == 200, 30, proc, log)
    return proc, url

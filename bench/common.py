"""Shared benchmark plumbing: logging to stderr, the ``--json`` last-line rule, servers on free loopback ports, RSS/CPU.

Conventions (the same as ``bench/engine.py``): progress goes to stderr; the table goes to stdout (and to
``bench/results.md``); with ``--json`` the LAST stdout line is one JSON object with every figure.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import platform
import selectors
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = ROOT / "bench"
CACHE_DIR = ROOT / "runs" / "bench"  # git-ignored
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024


def served_bundle() -> Path:
    """The bundle a plain ``make serve`` serves: the highest version of ``model_store/mnist-mixup`` that has a manifest
    (``1`` if none is built; ``MIXINFER_MODEL_VERSION`` pins are not read). Relative to the working directory when
    inside it, so that results name ``model_store/...`` rather than this machine's path."""
    from service.store import list_versions

    versions = list_versions(ROOT / "model_store", "mnist-mixup")
    path = ROOT / "model_store" / "mnist-mixup" / (versions[-1] if versions else "1")
    return path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path


def log(msg: str, *args: object) -> None:
    """Progress line on stderr (stdout is reserved for the table and the final JSON line)."""
    sys.stderr.write(time.strftime("%H:%M:%S ") + (msg % args if args else msg) + "\n")
    sys.stderr.flush()


def emit_json(obj: dict[str, Any]) -> None:
    """Print ``obj`` as ONE JSON line on stdout; callers print it last."""
    sys.stdout.write(json.dumps(obj, sort_keys=True, default=_json_default) + "\n")
    sys.stdout.flush()


def _json_default(value: object) -> object:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def machine_info() -> dict[str, Any]:
    """CPU model, core count, memory, OS, Python and library versions: printed next to every table."""
    cpu = platform.processor() or "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_gib = 0.0
    with contextlib.suppress(OSError, ValueError, IndexError):
        mem_gib = int(Path("/proc/meminfo").read_text().split()[1]) / 1024 / 1024
    info: dict[str, Any] = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "mem_gib": round(mem_gib, 1),
        "os": platform.platform(terse=True),
        "python": platform.python_version(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }
    for mod in ("onnxruntime", "fastapi", "uvicorn", "numpy"):
        with contextlib.suppress(ImportError):
            info[mod] = __import__(mod).__version__
    return info


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- process accounting ----------------------------------------------------------------------------------------
def rss_mib(pid: int) -> float:
    """Resident set size of a process in MiB (``/proc/<pid>/statm``)."""
    fields = Path(f"/proc/{pid}/statm").read_text().split()
    return int(fields[1]) * PAGE_KIB / 1024


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far, all its threads (``/proc/<pid>/stat``)."""
    raw = Path(f"/proc/{pid}/stat").read_text()
    fields = raw[raw.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def run_with_cpu(cmd: Sequence[str], *, env: dict[str, str] | None = None, timeout_s: float) -> tuple[str, float]:
    """Run ``cmd`` to completion within ``timeout_s``; returns (stdout, the child's own CPU seconds from ``wait4``)."""
    proc = subprocess.Popen(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    deadline = time.monotonic() + timeout_s
    out = io.BytesIO()
    err = io.BytesIO()
    sel = selectors.DefaultSelector()
    assert proc.stdout is not None and proc.stderr is not None
    sel.register(proc.stdout, selectors.EVENT_READ, out)
    sel.register(proc.stderr, selectors.EVENT_READ, err)
    open_streams = 2
    while open_streams:
        left = deadline - time.monotonic()
        if left <= 0:
            proc.kill()
            os.wait4(proc.pid, 0)
            raise RuntimeError(f"{cmd[0]} ran past {timeout_s:.0f} s")
        for key, _ in sel.select(timeout=min(left, 1.0)):
            chunk = os.read(key.fd, 65536)
            if chunk:
                key.data.write(chunk)
            else:
                sel.unregister(key.fileobj)
                open_streams -= 1
    sel.close()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}: {err.getvalue().decode()[-500:]}")
    return out.getvalue().decode(), usage.ru_utime + usage.ru_stime


# --- servers ----------------------------------------------------------------------------------------------------
@dataclass
class Server:
    """A server subprocess on ``127.0.0.1:port``; stop it with :meth:`stop` (SIGTERM, then SIGKILL)."""

    name: str
    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path
    rss_mib: dict[str, float] = field(default_factory=dict)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def sample_rss(self, when: str) -> float:
        value = rss_mib(self.pid)
        self.rss_mib[when] = round(value, 1)
        return value

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.pid)

    def wait_idle(self, timeout_s: float = 60.0, window_s: float = 0.3, busy_fraction: float = 0.1) -> float:
        """Wait until the server burns < ``busy_fraction`` of one core over ``window_s`` (it finished the work that
        a load generator abandoned when it stopped); returns the seconds waited."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout_s:
            c0 = self.cpu_seconds()
            time.sleep(window_s)
            if self.cpu_seconds() - c0 < busy_fraction * window_s:
                break
        return time.monotonic() - t0

    def stop(self, timeout_s: float = 20.0) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        return self.proc.returncode


def run_baseline_server(app: Any, port: int) -> None:
    """Serve a baseline app (I/O floor, naive server) on ``127.0.0.1:port`` until stopped: uvloop and httptools
    with no access log, as ``mixinfer serve`` runs, so that the comparison is about the app; warnings only."""
    import uvicorn

    uvicorn.run(
        app,
        host="127.0.0.1",
        port=port,
        loop="uvloop",
        http="httptools",
        log_level="warning",
        access_log=False,
    )


def http_get(url: str, timeout_s: float = 2.0) -> tuple[int, bytes]:
    """GET ``url``; returns (status, body); connection errors raise OSError."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            return int(resp.status), resp.read()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read()


def http_post(url: str, body: bytes, content_type: str, timeout_s: float = 10.0) -> tuple[int, bytes]:
    """POST ``body``; returns (status, body)."""
    req = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            return int(resp.status), resp.read()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read()


def start_server(
    name: str,
    cmd: Sequence[str],
    *,
    port: int,
    ready_path: str,
    env: dict[str, str] | None = None,
    timeout_s: float = 120.0,
    log_dir: Path = CACHE_DIR / "logs",
) -> Server:
    """Start ``cmd`` (which must listen on ``port``) and wait until ``GET ready_path`` answers 200."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    full_env = dict(os.environ)
    full_env.update(env or {})
    with log_path.open("wb") as fh:
        proc = subprocess.Popen(list(cmd), stdout=fh, stderr=subprocess.STDOUT, env=full_env, cwd=ROOT)
    server = Server(name, proc, port, log_path)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode} before it was ready; log: {_tail(log_path)}")
        with contextlib.suppress(OSError):
            status, _ = http_get(server.base_url + ready_path, timeout_s=1.0)
            if status == 200:
                return server
        time.sleep(0.1)
    server.stop()
    raise RuntimeError(f"{name} not ready on port {port} after {timeout_s:.0f} s; log: {_tail(log_path)}")


@contextlib.contextmanager
def running(name: str, cmd: Sequence[str], **kwargs: Any) -> Iterator[Server]:
    """:func:`start_server` as a context manager that always stops the server."""
    server = start_server(name, cmd, **kwargs)
    try:
        yield server
    finally:
        server.stop()


def _tail(path: Path, n: int = 1500) -> str:
    with contextlib.suppress(OSError):
        return path.read_text(errors="replace")[-n:]
    return "<no log>"


def fmt(value: float | None, digits: int = 1) -> str:
    """Table cell: a number or an en dash."""
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "–"
    return f"{value:.{digits}f}"


def scrape(base_url: str) -> dict[str, float]:
    """``GET base_url/metrics`` as {series with its labels: value} (Prometheus text format, comments skipped)."""
    status, body = http_get(base_url + "/metrics", timeout_s=10.0)
    if status != 200:
        raise RuntimeError(f"GET {base_url}/metrics answered {status}")
    out: dict[str, float] = {}
    for line in body.decode().splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def metric_total(series: dict[str, float], name: str, labels: str = "") -> float:
    """Sum of every series of ``name`` (exactly that name, e.g. ``mixinfer_batch_images_sum``) whose label text
    contains ``labels`` (e.g. ``stage="queue"``)."""
    return sum(v for k, v in series.items() if k.split("{", 1)[0] == name and labels in k)


def write_results_section(title: str, body: str, path: Path = BENCH_DIR / "results.md") -> None:
    """Put ``## title`` and ``body`` into ``path``, replacing that section if present (``bench/http.py`` writes the
    file first; the other scripts of ``make bench`` add their sections after it)."""
    heading = f"## {title}"
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    if heading in text:
        head, rest = text.split(heading, 1)
        tail = rest[rest.find("\n## ") + 1 :] if "\n## " in rest else ""
        text = head + tail
    path.write_text(text.rstrip("\n") + "\n\n" + heading + "\n\n" + body.strip("\n") + "\n", encoding="utf-8")


def generated_by(command: str, machine: dict[str, Any]) -> str:
    """The first line of a ``bench/results.md`` section: the command, the time, the machine and its load."""
    return (
        f"Generated by `{command}` (`make bench`) on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
        f"{machine['cpu']}, {machine['cores']} cores, load {machine['load_avg_1m']} at start."
    )


def publish(
    section: str, text: str, figures: dict[str, Any], *, started: float, results: bool, json_line: bool
) -> None:
    """The table on stdout; with ``results`` also as ``section`` of ``bench/results.md``; with ``json_line`` the
    figures, the machine and the seconds since ``started`` (``time.perf_counter``) as the last stdout line."""
    sys.stdout.write(text)
    if results:
        write_results_section(section, text)
    if json_line:
        emit_json({**figures, "machine": machine_info(), "elapsed_s": round(time.perf_counter() - started, 1)})

"""Faults: broken bundles refused at start-up, a broken hot swap keeps the old version serving, SIGTERM under load.

All against the real ``python -m service.cli serve`` subprocess (as deployed), on free loopback ports.
"""

from __future__ import annotations

import asyncio
import io
import json
import shutil
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from relserver import ADMIN_KEY, Proc, free_port, raw_post, read_response, serve_env, start_serve
from testtools import serve_until_exit
from tinybundle import make_tiny_bundle, rehash

pytestmark = pytest.mark.integration


def _png(shape: tuple[int, int, int], seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    c, h, w = shape
    arr = rng.integers(0, 256, (h, w, 3) if c == 3 else (h, w), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


# --- start-up refusals ---------------------------------------------------------------------------------------
def _flip_model_byte(bundle: Path) -> None:
    model = bundle / "model.onnx"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0x01
    model.write_bytes(bytes(data))


def _extra_file(bundle: Path) -> None:
    (bundle / "notes.txt").write_text("not listed in the manifest")


def _shape_mismatch(bundle: Path) -> None:
    rehash(bundle, input={"shape": [3, 8, 8]})  # the model and the pool are (1, 8, 8)


def _truncated_pool(bundle: Path) -> None:
    pool = bundle / "pool.npz"
    pool.write_bytes(pool.read_bytes()[:200])
    rehash(bundle)  # hashes match again: the refusal must come from reading the pool itself


def _wrong_name(bundle: Path) -> None:
    rehash(bundle, name="other")


BROKEN: dict[str, tuple[Callable[[Path], None], tuple[str, ...]]] = {
    "corrupted_model": (_flip_model_byte, ("sha256 mismatch", "model.onnx")),
    "extra_file": (_extra_file, ("extra file", "notes.txt")),
    "manifest_vs_pool_shape": (_shape_mismatch, ("shape", "expected (3, 8, 8), got (1, 8, 8)")),
    "truncated_pool": (_truncated_pool, ("pool.npz", "unreadable")),
    "manifest_name_vs_directory": (_wrong_name, ("manifest name", "'other'")),
}


@pytest.mark.parametrize("fault", sorted(BROKEN))
def test_broken_bundle_refused_at_start(tmp_path: Path, fault: str) -> None:
    bundle = make_tiny_bundle(tmp_path / "store")
    breaker, words = BROKEN[fault]
    breaker(bundle)
    env = serve_env(tmp_path / "store", "tiny", free_port())
    proc = serve_until_exit(env, timeout_s=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, f"{fault}: exit {proc.returncode}, log:\n{out[-2000:]}"
    assert "refusing to start" in out
    for word in words:
        assert word in out, f"{fault}: {word!r} missing from the refusal:\n{out[-2000:]}"
    assert "Traceback" not in out


def test_missing_bundle_refused_at_start(tmp_path: Path) -> None:
    make_tiny_bundle(tmp_path / "store")
    env = serve_env(tmp_path / "store", "nosuchmodel", free_port())
    proc = serve_until_exit(env, timeout_s=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "refusing to start" in out and "nosuchmodel" in out, out[-2000:]


# --- hot swap to a broken version ----------------------------------------------------------------------------
class Traffic:
    """Background /predict traffic from a thread; counts every outcome until stopped."""

    def __init__(self, base_url: str, body: bytes) -> None:
        self.outcomes: Counter[str] = Counter()
        self.versions: Counter[str] = Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(base_url, body), daemon=True)

    def _run(self, base_url: str, body: bytes) -> None:
        with httpx.Client(base_url=base_url, timeout=30) as client:
            while not self._stop.is_set():
                try:
                    r = client.post("/predict", content=body, headers={"Content-Type": "image/png"})
                except httpx.HTTPError as exc:
                    self.outcomes[type(exc).__name__] += 1
                    continue
                self.outcomes[str(r.status_code)] += 1
                if r.status_code == 200:
                    self.versions[r.json()["version"]] += 1

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=60)


def test_hot_swap_to_broken_version_keeps_serving(tmp_path: Path) -> None:
    store = tmp_path / "store"
    make_tiny_bundle(store, version="1", seed=0)
    _flip_model_byte(make_tiny_bundle(store, version="2", seed=1))  # corrupt: hash mismatch
    make_tiny_bundle(store, version="3", seed=2, shape=(1, 12, 12))  # valid, but other input shape
    body = _png((1, 8, 8))
    served = start_serve(store, "tiny", tmp_path / "serve.log", model_version="1", admin_key=ADMIN_KEY)
    try:
        admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
        with Traffic(served.base_url, body) as traffic:
            time.sleep(0.5)
            r = served.client.post("/v2/repository/models/tiny/load", json={"parameters": {"version": "2"}},
                                   headers=admin)  # fmt: skip
            assert r.status_code == 500, r.text
            assert "sha256 mismatch" in r.json()["error"] and "model.onnx" in r.json()["error"]
            r = served.client.post("/v2/repository/models/tiny/load", json={"parameters": {"version": "3"}},
                                   headers=admin)  # fmt: skip
            assert 400 <= r.status_code < 500, r.text
            assert "restart" in r.json()["error"]
            time.sleep(0.5)
        assert set(traffic.outcomes) == {"200"}, traffic.outcomes
        assert set(traffic.versions) == {"1"} and traffic.versions["1"] > 10
        meta = served.client.get("/v2/models/tiny").json()
        assert (
            served.client.post("/predict", content=body, headers={"Content-Type": "image/png"}).json()["version"] == "1"
            and "1" in meta["versions"]
        )
        assert served.metric("mixinfer_build_info", version="1") == 1
        assert served.metric("mixinfer_ready") == 1
    finally:
        served.stop()


# --- SIGTERM under load --------------------------------------------------------------------------------------
@dataclass
class Outcome:
    sent: float
    done: float
    kind: str  # HTTP status, or refused / closed (no response byte) / truncated / timeout


async def _load_until_exit(
    proc: Proc, request: bytes, clients: int, term_after_s: float
) -> tuple[list[Outcome], float]:
    """Closed-loop clients on keep-alive connections; SIGTERM after ``term_after_s``; run until the process exits."""
    outcomes: list[Outcome] = []
    term_at = float("inf")
    hard_stop = time.perf_counter() + term_after_s + 45

    def finished() -> bool:
        return proc.proc.poll() is not None or time.perf_counter() > hard_stop

    async def client() -> None:
        conn = None
        while not finished():
            t0 = time.perf_counter()
            if conn is None:
                try:
                    conn = await asyncio.open_connection("127.0.0.1", proc.port)
                except OSError:
                    outcomes.append(Outcome(t0, time.perf_counter(), "refused"))
                    await asyncio.sleep(0.02)
                    continue
            reader, writer = conn
            try:
                writer.write(request)
                status, headers, _ = await asyncio.wait_for(read_response(reader), timeout=30)
                kind = str(status)
                if headers.get("connection", "").lower() == "close":
                    writer.close()
                    conn = None
            except asyncio.IncompleteReadError as exc:
                kind = "truncated" if exc.partial else "closed"
                conn = None
            except (ConnectionResetError, BrokenPipeError):
                kind, conn = "closed", None
            except TimeoutError:
                kind, conn = "timeout", None
            outcomes.append(Outcome(t0, time.perf_counter(), kind))

    async def killer() -> None:
        nonlocal term_at
        await asyncio.sleep(term_after_s)
        term_at = time.perf_counter()
        proc.proc.send_signal(signal.SIGTERM)

    await asyncio.gather(killer(), *(client() for _ in range(clients)))
    return outcomes, term_at


def test_sigterm_under_load_completes_in_flight_and_refuses_new(tmp_path: Path) -> None:
    store = tmp_path / "store"
    # many blends per image make every batch take a while, so requests are really in flight at SIGTERM
    make_tiny_bundle(store, shape=(3, 32, 32), mi={"n_pl": 1500})
    served = start_serve(store, "tiny", tmp_path / "serve.log", max_batch_images=8, request_timeout_s=20)
    request = raw_post(f"127.0.0.1:{served.port}", "/predict", _png((3, 32, 32)), "image/png")
    try:
        outcomes, term_at = asyncio.run(_load_until_exit(served, request, clients=16, term_after_s=2.0))
        code = served.proc.wait(timeout=30)
    finally:
        served.stop()
    log = served.log()
    kinds = Counter(o.kind for o in outcomes)
    before = [o for o in outcomes if o.sent < term_at - 0.05]
    in_flight = [o for o in before if o.done > term_at]
    after = [o for o in outcomes if o.sent >= term_at]
    assert code in (0, -signal.SIGTERM), f"exit code {code}: {log[-2000:]}"
    assert in_flight, f"no request was in flight at SIGTERM; outcomes {kinds}"
    assert all(o.kind == "200" for o in before), Counter(o.kind for o in before)
    assert {o.kind for o in after} <= {"200", "503", "refused", "closed"}, Counter(o.kind for o in after)
    assert "truncated" not in kinds and "timeout" not in kinds
    assert any(o.kind in ("refused", "503", "closed") for o in after), "new requests were never refused"
    assert "Traceback" not in log
    print(f"sigterm: {len(in_flight)} in flight completed, outcomes {dict(kinds)}, exit {code}")


def test_store_fixture_is_untouched(tmp_path: Path) -> None:
    """The breakers work on copies: the same tiny bundle loads fine when left alone (guards the tests above)."""
    bundle = make_tiny_bundle(tmp_path / "store")
    copy = tmp_path / "copy" / "tiny" / "1"
    shutil.copytree(bundle, copy)
    from service.store import load_bundle

    assert load_bundle(copy).manifest.name == "tiny"
    assert json.loads((copy / "manifest.json").read_text())["version"] == "1"

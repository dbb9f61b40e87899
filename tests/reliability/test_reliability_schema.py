"""Schemathesis against the real server's own ``/openapi.json``: every operation, every declared body type.

Bounded (a fixed number of generated examples per operation, no shrinking beyond Hypothesis' defaults); checks
that no response is a server error and that every response conforms to the schema (status declared, body
matching the declared model, content type declared).
"""

from __future__ import annotations

import io
from collections.abc import Iterator

import numpy as np
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from PIL import Image
from relserver import ADMIN_KEY, Proc, start_serve
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from tinybundle import make_tiny_bundle

pytestmark = pytest.mark.integration

IMAGE_TYPES = ("image/png", "image/jpeg", "image/webp", "image/bmp", "image/gif")


def _png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 8), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


@schemathesis.serializer(*IMAGE_TYPES)
def _image_body(ctx: object, value: object) -> dict[str, bytes]:
    """Generated ``format: binary`` bodies are random bytes; one in two is swapped for a real PNG so that the
    success path (200 with a body matching the schema) is exercised too."""
    raw = value if isinstance(value, bytes) else str(value).encode()
    return {"content": _png() if len(raw) % 2 == 0 else raw}


@schemathesis.serializer("application/octet-stream")
def _octet_body(ctx: object, value: object) -> dict[str, bytes]:
    return {"content": value if isinstance(value, bytes) else str(value).encode()}


@pytest.fixture(scope="module")
def schema_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proc]:
    store = tmp_path_factory.mktemp("schema-store")
    make_tiny_bundle(store, name="tiny", version="1", seed=0)
    make_tiny_bundle(store, name="tiny", version="2", seed=1)
    served = start_serve(store, "tiny", store / "serve.log", model_version="1", admin_key=ADMIN_KEY)
    try:
        yield served
    finally:
        served.stop()


CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


def _aim(pair: tuple[schemathesis.Case, bool]) -> schemathesis.Case:
    """Half of the cases name the served model/version and carry the admin key, so the generated bodies reach the
    handlers instead of stopping at a 404 or 401."""
    case, aim = pair
    # an aimed unload takes the served model down for every later operation (readiness then answers 503, which
    # the server-error check counts): unload's generated bodies are fuzzed unaimed, its semantics tested elsewhere
    if aim and not case.path.endswith("/unload"):
        params = case.path_parameters or {}
        if "name" in params:
            params["name"] = "tiny"
        if "version" in params:
            params["version"] = "1"
        case.headers = {**(case.headers or {}), "Authorization": f"Bearer {ADMIN_KEY}"}
    return case


def test_openapi_conformance(schema_server: Proc) -> None:
    """Every operation of the live schema, 25 generated cases each (deterministic), all checks on every answer."""
    schema = schemathesis.openapi.from_url(f"{schema_server.base_url}/openapi.json")
    failures: list[str] = []
    operations = 0
    calls = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        operations += 1

        @given(case=st.tuples(operation.as_strategy(), st.booleans()).map(_aim))
        @settings(
            max_examples=25,
            deadline=None,
            derandomize=True,
            database=None,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        def run(case: schemathesis.Case) -> None:
            nonlocal calls
            calls += 1
            response = case.call(timeout=30)
            case.validate_response(response, checks=CHECKS)

        try:
            run()
        except Exception as exc:  # noqa: BLE001 - collect every operation's failure, report them together
            failures.append(f"{operation.label}: {type(exc).__name__}: {str(exc)[:1500]}")
    assert operations >= 10, f"the schema lists only {operations} operations"
    assert schema_server.alive()
    assert not failures, "\n\n".join(failures)
    assert calls >= operations * 5


def test_server_alive_after_fuzzing(schema_server: Proc) -> None:
    five_xx = [(labels, v) for labels, v in schema_server.metric_samples("mixinfer_requests_total")
               if labels["code"].startswith("5") and v > 0 and "health" not in labels["route"]]  # fmt: skip
    assert five_xx == []
    r = schema_server.client.post("/predict", content=_png(), headers={"Content-Type": "image/png"})
    assert r.status_code == 200 and r.json()["version"] in ("1", "2")  # the fuzzer may have hot-swapped

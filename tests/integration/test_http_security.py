"""API keys, admin key, mode override and per-key rate limit over a real server."""

from __future__ import annotations

import numpy as np
import pytest
import tritonclient.http as tc
from mixserver import ADMIN_KEY, run_server, settings_for
from tritonclient.utils import InferenceServerException

pytestmark = pytest.mark.integration

KEYS = ("client-key-one-0123456789", "client-key-two-0123456789")
BODY = {"instances": [np.full((8, 8), 0.5).tolist()]}


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def keyed(http_store):
    with run_server(settings_for(http_store, model_version="1", api_keys=KEYS, admin_key=ADMIN_KEY)) as srv:
        yield srv


def test_predict_needs_a_configured_key(keyed):
    c = keyed.client
    r = c.post("/predict", json=BODY)
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert r.json()["error"]["code"] == "unauthorized" and "missing API key" in r.json()["error"]["message"]
    r = c.post("/predict", json=BODY, headers=bearer("client-key-one-012345678X"))
    assert r.status_code == 401 and r.json()["error"]["message"] == "wrong API key"
    for key in KEYS:
        assert c.post("/predict", json=BODY, headers=bearer(key)).status_code == 200


def test_openapi_declares_bearer_security_on_keyed_routes(keyed):
    doc = keyed.client.get("/openapi.json").json()
    scheme = {"type": "http", "scheme": "bearer", "description": "Authorization: Bearer <key>"}
    assert doc["components"]["securitySchemes"] == {"HTTPBearer": scheme}
    keyed_ops = [
        ("/predict", "post"),
        ("/v2/models/{name}", "get"),
        ("/v2/models/{name}/infer", "post"),
        ("/v2/models/{name}/versions/{version}/infer", "post"),
        ("/v2/repository/models/{name}/load", "post"),
    ]
    for path, method in keyed_ops:
        assert doc["paths"][path][method]["security"] == [{"HTTPBearer": []}], path
    for path in ("/health/live", "/health/ready", "/metrics", "/v2/health/ready"):
        assert "security" not in doc["paths"][path]["get"], path


def test_keyed_metadata_route_and_lowercase_scheme(keyed):
    url = "/v2/models/tiny"
    assert keyed.client.get(url).status_code == 401
    assert keyed.client.get(url, headers={"authorization": f"Basic {KEYS[0]}"}).status_code == 401
    assert keyed.client.get(url, headers={"authorization": f"bearer {KEYS[0]}"}).status_code == 200


def test_health_and_metrics_stay_open_without_a_metrics_key(keyed):
    for path in ("/health/live", "/health/ready", "/v2/health/live", "/v2/health/ready", "/metrics", "/v2"):
        assert keyed.client.get(path).status_code == 200, path


def test_oip_infer_needs_a_key_too(keyed):
    x = np.zeros((1, 1, 8, 8), np.float32)
    inp = tc.InferInput("images", [1, 1, 8, 8], "FP32")
    inp.set_data_from_numpy(x)
    client = tc.InferenceServerClient(keyed.host_port)
    with pytest.raises(InferenceServerException, match="missing API key"):
        client.infer("tiny", [inp])
    assert client.infer("tiny", [inp], headers=bearer(KEYS[0])).as_numpy("top_probabilities").shape == (1, 3)
    client.close()


def test_an_api_key_never_authorises_admin_routes(keyed):
    c = keyed.client
    url = "/v2/repository/models/tiny/load"
    r = c.post(url, json={"parameters": {"version": "1"}}, headers=bearer(KEYS[0]))
    assert r.status_code == 403 and "does not authorise admin" in r.json()["error"]
    r = c.post(url, json={"parameters": {"version": "1"}})
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    # a wrong admin key is a 401 like a wrong API key: 403 is kept for a valid key without the right
    r = c.post(url, json={"parameters": {"version": "1"}}, headers=bearer("not-the-admin-key-0123"))
    assert r.status_code == 401 and r.json()["error"] == "wrong admin key" and r.headers["www-authenticate"] == "Bearer"
    r = c.post(url, json={"parameters": {"version": "1"}}, headers=bearer(ADMIN_KEY))
    assert r.status_code == 200 and r.json()["version"] == "1"


def test_admin_routes_are_disabled_without_an_admin_key(http_store):
    with run_server(settings_for(http_store, model_version="1")) as srv:
        r = srv.client.post("/v2/repository/models/tiny/load", json={}, headers=bearer("anything"))
        assert r.status_code == 403 and "disabled" in r.json()["error"]


def test_mode_override_is_refused_unless_allowed(keyed):
    r = keyed.client.post("/predict?mode=off", json=BODY, headers=bearer(KEYS[0]))
    assert r.status_code == 403
    msg = r.json()["error"]["message"]
    assert "ALLOW_MODE_OVERRIDE" in msg and "undefended" in msg
    assert keyed.client.post("/predict?mode=combined", json=BODY, headers=bearer(KEYS[0])).status_code == 200
    oip = {
        "inputs": [{"name": "images", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0.5] * 64}],
        "parameters": {"mode": "pl"},
    }
    r = keyed.client.post("/v2/models/tiny/infer", json=oip, headers=bearer(KEYS[0]))
    assert r.status_code == 403 and "ALLOW_MODE_OVERRIDE" in r.json()["error"]


def test_rate_limit_is_per_key(http_store):
    settings = settings_for(http_store, model_version="1", api_keys=KEYS, rate_limit_per_key=0.5)
    with run_server(settings) as srv:
        assert srv.client.post("/predict", json=BODY, headers=bearer(KEYS[0])).status_code == 200
        r = srv.client.post("/predict", json=BODY, headers=bearer(KEYS[0]))
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        assert r.json()["error"]["code"] == "rate_limited" and "rate limit" in r.json()["error"]["message"]
        assert srv.client.post("/predict", json=BODY, headers=bearer(KEYS[1])).status_code == 200


def test_keys_from_files_authorise_a_real_server(http_store, tmp_path):
    """MIXINFER_API_KEYS_FILE and MIXINFER_ADMIN_KEY_FILE behind Kubernetes-style ``..data`` links."""
    stamp = tmp_path / "..2026_12_06"
    stamp.mkdir()
    (stamp / "keys").write_text(f"{KEYS[0]}\n{KEYS[1]}\n")
    (stamp / "admin").write_text(ADMIN_KEY + "\n")
    (tmp_path / "..data").symlink_to(stamp.name)
    for name in ("keys", "admin"):
        (tmp_path / name).symlink_to(f"..data/{name}")
    settings = settings_for(
        http_store, model_version="1", api_keys_file=tmp_path / "keys", admin_key_file=tmp_path / "admin"
    )
    with run_server(settings) as srv:
        assert srv.client.post("/predict", json=BODY).status_code == 401
        for key in KEYS:
            assert srv.client.post("/predict", json=BODY, headers=bearer(key)).status_code == 200
        load = "/v2/repository/models/tiny/load"
        r = srv.client.post(load, json={"parameters": {"version": "1"}}, headers=bearer(ADMIN_KEY))
        assert r.status_code == 200 and r.json()["version"] == "1"


def test_admin_key_guessing_is_throttled_per_client_address(http_store):
    """Without MIXINFER_RATE_LIMIT_PER_KEY the admin routes still allow 10 quick tries, then 1 per second, per
    client address; the refusal comes before any key is compared, the right key included."""
    with run_server(settings_for(http_store, model_version="1", admin_key=ADMIN_KEY)) as srv:
        url = "/v2/repository/models/tiny/load"
        codes = [srv.client.post(url, json={}, headers=bearer(f"guess-{i:04d}")).status_code for i in range(10)]
        assert codes == [401] * 10
        r = srv.client.post(url, json={}, headers=bearer("guess-final"))
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert r.json()["error"].startswith("rate limit of 1 requests/s per client address exceeded")
        assert srv.client.post(url, json={}, headers=bearer(ADMIN_KEY)).status_code == 429
        assert srv.client.post("/predict", json=BODY).status_code == 200  # other routes are not affected


def test_admin_routes_follow_the_configured_rate_limit(http_store):
    settings = settings_for(http_store, model_version="1", admin_key=ADMIN_KEY, rate_limit_per_key=0.2)
    with run_server(settings) as srv:
        url = "/v2/repository/models/tiny/load"
        assert srv.client.post(url, json={}, headers=bearer(ADMIN_KEY)).status_code == 200
        r = srv.client.post(url, json={}, headers=bearer(ADMIN_KEY))
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("/v2/models/guess/ready", "unknown model 'guess'"),
        ("/v2/models/tiny/versions/7/ready", "model 'tiny' version '7' is not served"),
    ],
)
def test_model_readiness_does_not_name_the_served_model(keyed, path, message):
    """The readiness route is open to anyone (no key): its 404 says what was asked for, not what is served."""
    r = keyed.client.get(path)
    assert r.status_code == 404 and r.json() == {"error": message}
    assert keyed.client.get("/v2/models/tiny/ready").status_code == 200

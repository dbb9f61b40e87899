"""The browser page's files and JSON routes on a real server: strict CSP, package data, /info, /recent-gaps."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from mixserver import run_server, settings_for

from service.api.routes.page import CONTENT_SECURITY_POLICY
from service.api.runtime import RECENT_GAPS

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
STATIC = REPO / "service" / "api" / "static"


def test_the_page_is_served_at_root_and_ui_with_a_strict_csp(server):
    for path in ("/", "/ui"):
        r = server.client.get(path)
        assert r.status_code == 200 and r.headers["content-type"] == "text/html; charset=utf-8"
        assert r.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
        assert r.headers["x-content-type-options"] == "nosniff"
    assert "'unsafe-inline'" not in CONTENT_SECURITY_POLICY and "script-src 'self'" in CONTENT_SECURITY_POLICY
    html = r.text
    # no inline script or style, nothing from another origin (the CSP would block it anyway: fail here first)
    assert re.findall(r"<script\b[^>]*>", html) == ['<script src="/ui/app.js" defer>']
    assert "<style" not in html and " style=" not in html
    assert not re.search(r"\son[a-z]+=", html)  # no inline event handlers
    assert not re.search(r"(src|href)=\"(https?:)?//", html)


def test_every_file_the_page_references_is_served_with_its_type(server):
    html = server.client.get("/").text
    refs = sorted(set(re.findall(r"(?:src|href)=\"(/ui/[^\"]+)\"", html)))
    assert "/ui/app.js" in refs and "/ui/style.css" in refs and len(refs) >= 14
    types = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8", ".png": "image/png"}
    for ref in refs:
        r = server.client.get(ref)
        assert r.status_code == 200, ref
        assert r.headers["content-type"] == types[Path(ref).suffix], ref
        assert r.content == (STATIC / ref.removeprefix("/ui/")).read_bytes()
    missing = server.client.get("/ui/../config.py")
    assert missing.status_code == 404
    r = server.client.get("/ui/nope.js")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


def test_every_sample_button_is_an_example_from_examples_dir():
    html = (STATIC / "index.html").read_text()
    samples = re.findall(r'data-sample="([^"]+)"', html)
    assert sorted(samples) == sorted(p.name for p in (REPO / "examples").glob("*.png"))
    for name in samples:  # `make examples` refreshes both
        assert (STATIC / "samples" / name).read_bytes() == (REPO / "examples" / name).read_bytes()


def test_recent_gaps_are_the_gaps_predict_answered(http_store):
    with run_server(settings_for(http_store, model_version="1", seed=0, response_detail="full")) as srv:
        empty = srv.client.get("/recent-gaps").json()
        assert empty["gaps"] == [] and empty["window"] == RECENT_GAPS
        images = np.random.default_rng(1).random((5, 8, 8)).tolist()
        answered = srv.client.post("/predict", json={"instances": images}).json()["predictions"]
        body = srv.client.get("/recent-gaps").json()
        assert body["gaps"] == pytest.approx([p["detection_gap"] for p in answered], abs=1e-6)
        assert body["threshold"] == answered[0]["threshold"]
        assert (body["model"], body["version"]) == ("tiny", "1")
        for _ in range(3):  # 600 images > the window
            assert srv.client.post("/predict?top_k=1", json={"instances": images * 40}).status_code == 200
        assert len(srv.client.get("/recent-gaps").json()["gaps"]) == RECENT_GAPS


def test_info_names_the_served_model(server):
    body = server.client.get("/info").json()
    assert body["model"] == "tiny" and body["version"] == "1"
    assert body["input_shape"] == [1, 8, 8] and len(body["classes"]) == 4


def test_at_the_label_default_gaps_are_hidden_and_info_says_so(http_store):
    with run_server(settings_for(http_store, model_version="1")) as srv:
        assert srv.client.get("/info").json()["response_detail"] == "label"
        r = srv.client.get("/recent-gaps")
        assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
        assert "MIXINFER_RESPONSE_DETAIL=label" in r.json()["error"]["message"]

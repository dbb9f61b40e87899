"""A refusal sent before the route reads the body (outside review): clients that write their whole body before
reading (Python's urllib, requests) must read it, not a connection reset, as issue 13 asked for the 413."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import numpy as np
import pytest
from mixserver import png_bytes, run_server, settings_for

#: far more than the loopback socket buffers hold, well under the default 16 MiB body limit
BODY = 8 * 1024 * 1024


def urllib_post(url: str, body: bytes, content_type: str) -> urllib.error.HTTPError:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": content_type})
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(req, timeout=60)
    return info.value


@pytest.fixture(scope="module")
def banning(http_store):
    settings = settings_for(
        http_store, name="rgb", query_watch="ban", query_watch_ban_hits=1, query_watch_resends=0, seed=0
    )
    with run_server(settings) as served:
        yield served


def test_urllib_reads_a_415_sent_before_the_body_is_read(banning):
    err = urllib_post(f"{banning.base_url}/predict", b"\0" * BODY, "text/x-nope")
    assert err.code == 415 and json.loads(err.read())["error"]["code"] == "unsupported_media_type"


def test_urllib_reads_an_unknown_model_404(banning):
    err = urllib_post(f"{banning.base_url}/v2/models/nope/infer", b"\0" * BODY, "application/octet-stream")
    assert err.code == 404


def test_urllib_reads_the_403_of_a_banned_client(banning):
    image = png_bytes(np.zeros((8, 8, 3), np.uint8))
    for _ in range(2):  # the first send, then an exact resend beyond the 0 allowed: banned
        banning.client.post("/predict", content=image, headers={"content-type": "image/png"})
    err = urllib_post(f"{banning.base_url}/predict", b"\0" * BODY, "image/png")
    assert err.code == 403 and json.loads(err.read())["error"]["code"] == "client_banned"

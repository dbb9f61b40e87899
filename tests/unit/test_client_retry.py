"""service.client's pure parts: Retry-After, the retry policy, error bodies; and that registering ``predict``
imports no httpx (the server images have none)."""

from __future__ import annotations

import subprocess
import sys
from email.utils import formatdate

import httpx
import pytest

from service.client.clients import RetryPolicy, error_of, retry_after_seconds


def test_retry_after_as_seconds_or_an_http_date():
    assert retry_after_seconds("3") == 3.0
    assert retry_after_seconds(" 0 ") == 0.0
    now = 1_800_000_000.0
    assert retry_after_seconds(formatdate(now + 7, usegmt=True), now=now) == pytest.approx(7.0)
    assert retry_after_seconds(formatdate(now - 7, usegmt=True), now=now) == 0.0
    assert retry_after_seconds(None) is None
    assert retry_after_seconds("soon") is None
    assert retry_after_seconds("²") is None  # a digit to str.isdigit, not to int()


@pytest.mark.parametrize("status", [400, 401, 403, 404, 413, 500, 504])
def test_only_429_and_503_are_retried(status):
    assert RetryPolicy().delay(status, 1.0, attempt=0) is None


def test_the_policy_waits_retry_after_else_backs_off_and_gives_up():
    policy = RetryPolicy(retries=2, max_wait_s=10.0, backoff_s=0.5)
    assert policy.delay(429, 2.0, attempt=0) == 2.0
    assert policy.delay(503, None, attempt=0) == 0.5
    assert policy.delay(503, None, attempt=1) == 1.0
    assert policy.delay(503, None, attempt=2) is None  # retries spent
    assert RetryPolicy(retries=9, max_wait_s=3.0).delay(503, None, attempt=8) == 3.0  # backoff capped, not given up
    assert policy.delay(429, 11.0, attempt=0) is None  # longer than max_wait_s: raise at once


def test_error_bodies_of_both_shapes_and_of_none():
    rest = httpx.Response(
        429,
        json={"error": {"code": "rate_limited", "message": "slow down"}},
        headers={"Retry-After": "2", "X-Request-ID": "abc"},
    )
    err = error_of(rest)
    assert (err.status, err.code, err.message, err.request_id, err.retry_after_s) == (
        429,
        "rate_limited",
        "slow down",
        "abc",
        2.0,
    )
    assert str(err) == "HTTP 429 rate_limited: slow down"
    oip = error_of(httpx.Response(404, json={"error": "unknown model 'x'"}))
    assert (oip.code, oip.message) == ("http_error", "unknown model 'x'")
    proxy = error_of(httpx.Response(502, text="<html>bad gateway</html>"))
    assert (proxy.status, proxy.code, proxy.message) == (502, "http_error", "<html>bad gateway</html>")


def test_registering_the_predict_command_imports_no_httpx():
    code = "import sys, service.cli; service.cli.build_parser(); print('httpx' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.strip() == "False"


def test_the_predict_key_variable_does_not_stop_mixinfer_serve():
    from service.client.cli import API_KEY_ENV
    from service.config import unknown_variables

    assert API_KEY_ENV == "MIXINFER_CLIENT_API_KEY"
    assert unknown_variables({API_KEY_ENV: "k", "MIXINFER_CLIENT_API_KEYS": "k"}) == [
        "MIXINFER_CLIENT_API_KEYS is not a mixinfer setting; did you mean MIXINFER_CLIENT_API_KEY?"
    ]

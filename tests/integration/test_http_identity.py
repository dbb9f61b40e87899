"""Client identity (issue 13 item 7): X-Forwarded-For is believed from MIXINFER_TRUSTED_PROXIES only, by uvicorn and
by the one identity function the rate limiter and the query watch use; by default nobody can pose as another
address (uvicorn's own default trusts 127.0.0.1)."""

from __future__ import annotations

import numpy as np
import pytest
from mixserver import run_server, settings_for

from service.api.identity import TrustedProxies, resolve_client

pytestmark = pytest.mark.integration

BODY = {"instances": [np.full((8, 8), 0.5).tolist()]}


def post(srv, forwarded_for: str | None = None) -> int:
    headers = {} if forwarded_for is None else {"X-Forwarded-For": forwarded_for}
    return srv.client.post("/predict", json=BODY, headers=headers).status_code


def test_forwarded_for_is_ignored_without_trusted_proxies(http_store):
    """One loopback client, a fresh X-Forwarded-For per request: still one client to the rate limiter."""
    with run_server(settings_for(http_store, model_version="1", rate_limit_per_key=0.2)) as srv:
        assert post(srv, "203.0.113.1") == 200
        assert post(srv, "203.0.113.2") == 429
        assert post(srv, "203.0.113.3, 198.51.100.9") == 429
        assert post(srv) == 429


def test_a_trusted_proxy_names_the_client(http_store):
    settings = settings_for(http_store, model_version="1", rate_limit_per_key=0.2, trusted_proxies="127.0.0.0/8")
    with run_server(settings) as srv:
        assert post(srv, "203.0.113.1") == 200
        assert post(srv, "203.0.113.2") == 200  # another client behind the proxy
        assert post(srv, "203.0.113.1") == 429  # the first one again
        # the left-most entries are the client's own words: only the right-most untrusted hop counts
        assert post(srv, "198.51.100.7, 203.0.113.2") == 429
        assert post(srv, "203.0.113.3, 127.0.0.5") == 200  # a second trusted hop is skipped


@pytest.mark.parametrize(
    ("peer", "forwarded_for", "trusted", "expected"),
    [
        ("10.1.2.3", "1.1.1.1", (), "10.1.2.3"),
        ("10.1.2.3", "1.1.1.1", ("10.0.0.0/8",), "1.1.1.1"),
        ("10.1.2.3", "6.6.6.6, 1.1.1.1", ("10.0.0.0/8",), "1.1.1.1"),
        ("10.1.2.3", "1.1.1.1, 10.9.9.9", ("10.0.0.0/8",), "1.1.1.1"),
        ("10.1.2.3", "10.4.4.4, 10.9.9.9", ("10.0.0.0/8",), "10.4.4.4"),
        ("10.1.2.3", " , ", ("10.0.0.0/8",), "10.1.2.3"),
        ("10.1.2.3", None, ("10.0.0.0/8",), "10.1.2.3"),
        ("192.0.2.1", "1.1.1.1", ("10.0.0.0/8",), "192.0.2.1"),
        ("::1", "2001:db8::7", ("::1",), "2001:db8::/64"),
        ("::1", "not-an-ip", ("::1",), "not-an-ip"),
        (None, "1.1.1.1", ("10.0.0.0/8",), "unknown"),
    ],
)
def test_resolve_client(peer, forwarded_for, trusted, expected):
    """The rule other front ends (gRPC metadata) call with their own peer and header."""
    assert resolve_client(peer, forwarded_for, TrustedProxies(trusted)) == expected


def test_an_ipv6_client_is_its_64_network(http_store):
    """One IPv6 host owns a whole /64 (SLAAC, privacy addresses): a client per address let one host rotate through
    2**64 identities past the admin throttle, the rate limiter and the query watch (outside review)."""
    settings = settings_for(
        http_store, model_version="1", admin_key="admin-key-0123456789abcdef", trusted_proxies="::1, 127.0.0.1"
    )
    with run_server(settings) as srv:
        codes = [
            srv.client.post(
                "/v2/repository/index",
                headers={"Authorization": "Bearer guess", "X-Forwarded-For": f"2001:db8:1:2::{i:x}"},
            ).status_code
            for i in range(12)
        ]
        assert codes[:10] == [401] * 10 and codes[10:] == [429, 429], codes  # the admin throttle: 10, then 1/s
        other = srv.client.post(
            "/v2/repository/index", headers={"Authorization": "Bearer guess", "X-Forwarded-For": "2001:db8:1:3::1"}
        )
        assert other.status_code == 401  # another /64 is another client


@pytest.mark.parametrize(
    ("address", "client"),
    [("2001:db8:1:2::7", "2001:db8:1:2::/64"), ("2001:DB8:1:2:aaaa::1", "2001:db8:1:2::/64"),
     ("::ffff:203.0.113.9", "203.0.113.9"), ("203.0.113.9", "203.0.113.9"), ("not-an-ip", "not-an-ip")],
)  # fmt: skip
def test_client_identity_of_an_address(address, client):
    assert resolve_client("10.0.0.1", address, TrustedProxies(("10.0.0.0/8",))) == client

"""Who is asking: the ONE client-identity rule of the server, from ``MIXINFER_TRUSTED_PROXIES``.

The client is the TCP peer, unless the peer is a trusted proxy: then it is the right-most ``X-Forwarded-For``
entry that is not itself a trusted proxy (the entries to its left are whatever the client wrote, so they are never
believed). An IPv6 client is its /64 network (:func:`client_of`). With no trusted proxies (the default)
``X-Forwarded-For`` is ignored, so no client can pose as another address. uvicorn applies the same rule to the
scope (``forwarded_allow_ips`` from :func:`uvicorn_proxy_options`); applying it again to an address uvicorn already
resolved gives that address back.

Every per-client feature uses :func:`client_address` (HTTP) or :func:`resolve_client` (any front end that has a
peer address and an ``X-Forwarded-For`` value, e.g. gRPC metadata): the rate limiter, the admin-route throttle and
the query-attack watch.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterable
from functools import cached_property
from typing import Any

from starlette.requests import HTTPConnection

LOGGER = logging.getLogger(__name__)

UNKNOWN_CLIENT = "unknown"
#: the network an IPv6 client is identified by
IPV6_CLIENT_PREFIX = 64
_XFF = b"x-forwarded-for"


class TrustedProxies:
    """Addresses and networks (``10.0.0.0/8``, ``::1``) whose ``X-Forwarded-For`` is believed."""

    def __init__(self, entries: Iterable[str]) -> None:
        self.entries = tuple(entries)

    @cached_property
    def _networks(self) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        return tuple(ipaddress.ip_network(e, strict=False) for e in self.entries)

    def __bool__(self) -> bool:
        return bool(self.entries)

    def __contains__(self, host: str) -> bool:
        if not self.entries:
            return False
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return False
        return any(address in net for net in self._networks)


def resolve_client(peer: str | None, forwarded_for: str | None, trusted: TrustedProxies) -> str:
    """The client from the TCP ``peer`` and the ``X-Forwarded-For`` value (see the module docstring), as
    :func:`client_of` names it."""
    if not peer:
        return UNKNOWN_CLIENT
    if peer not in trusted or not forwarded_for:
        return client_of(peer)
    hops = [h.strip() for h in forwarded_for.split(",") if h.strip()]
    for hop in reversed(hops):
        if hop not in trusted:
            return client_of(hop)
    return client_of(hops[0] if hops else peer)  # every hop is a trusted proxy: the first one is the client


def client_of(address: str) -> str:
    """The client an address belongs to: an IPv6 address's /64 network (one host owns a whole /64 through SLAAC
    and privacy addresses, so a client per address would let it rotate through 2**64 identities past every
    per-client limit), an IPv4-mapped IPv6 address's IPv4 address, any other address itself."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, IPV6_CLIENT_PREFIX), strict=False))
    return address


def client_address(connection: HTTPConnection) -> str:
    """The client of an HTTP request under the app's ``MIXINFER_TRUSTED_PROXIES`` (see :func:`client_of`)."""
    trusted: TrustedProxies = connection.app.state.trusted_proxies
    peer = connection.client.host if connection.client else None
    if not trusted:
        return client_of(peer) if peer else UNKNOWN_CLIENT
    forwarded = [v.decode("latin-1") for k, v in connection.scope["headers"] if k == _XFF]
    return resolve_client(peer, ", ".join(forwarded) or None, trusted)


def uvicorn_proxy_options(trusted_proxies: tuple[str, ...]) -> dict[str, Any]:
    """uvicorn's proxy-header options for ``MIXINFER_TRUSTED_PROXIES``: trust exactly those (none by default;
    uvicorn's own default trusts 127.0.0.1, which lets any local client pose as any address)."""
    return {"proxy_headers": bool(trusted_proxies), "forwarded_allow_ips": list(trusted_proxies)}

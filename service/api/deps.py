"""Typed dependencies: settings, the model holder, metrics, API-key and admin-key checks, per-key rate limit.

Every dependency is ``async def`` on purpose: FastAPI runs a plain ``def`` dependency on its thread pool, which
costs a thread hop per dependency per request. The inference routes take ONE dependency, :data:`ServedDep`
(API key, rate limit and the app state together): FastAPI's generic solver costs tens of microseconds per
dependency, and the seven solves /predict used to make were the largest cost of the route's own code.
"""

from __future__ import annotations

import hmac
import logging
import threading
import time
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.openapi.models import HTTPBearer as HTTPBearerModel
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.security.base import SecurityBase
from fastapi.security.utils import get_authorization_scheme_param

from service.api.identity import client_address
from service.api.runtime import ModelHolder
from service.config import Settings
from service.errors import ForbiddenError, RateLimitedError, UnauthorizedError
from service.metrics import Metrics
from service.mi.params import Mode

LOGGER = logging.getLogger(__name__)

#: clients whose buckets are kept; beyond it the least recently seen is forgotten (a full bucket again)
MAX_BUCKETS = 10_000
_BEARER_DESCRIPTION = "Authorization: Bearer <key>"
_bearer = HTTPBearer(auto_error=False, description=_BEARER_DESCRIPTION)
Bearer = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_holder(request: Request) -> ModelHolder:
    return request.app.state.holder


async def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


SettingsDep = Annotated[Settings, Depends(get_settings)]
HolderDep = Annotated[ModelHolder, Depends(get_holder)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]


class RateLimiter:
    """Token bucket per client identity: ``rate`` requests per second, bursts up to ``burst`` (default
    ``max(1, rate)``); ``per`` names the identity in the refusal."""

    def __init__(self, rate: float, burst: float | None = None, per: str = "key") -> None:
        self.rate = rate
        self.burst = max(1.0, rate) if burst is None else burst
        self.per = per
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def tracked(self) -> int:
        """Clients whose buckets are kept now."""
        with self._lock:
            return len(self._buckets)

    def take(self, who: str) -> None:
        """Spend one token of ``who`` or raise :class:`RateLimitedError` with the seconds until the next one."""
        now = time.monotonic()
        with self._lock:
            buckets = self._buckets
            # pop + insert keeps the dict in least-recently-seen order: forgetting the oldest is O(1), whatever the
            # number of clients (a purge scan per request cost O(clients) once more than MAX_BUCKETS were fresh)
            tokens, last = buckets.pop(who, (self.burst, now))
            if len(buckets) >= MAX_BUCKETS:
                del buckets[next(iter(buckets))]
            tokens = min(self.burst, tokens + (now - last) * self.rate)
            if tokens < 1.0:
                buckets[who] = (tokens, now)
                wait = (1.0 - tokens) / self.rate
                raise RateLimitedError(
                    f"rate limit of {self.rate:g} requests/s per {self.per} exceeded; retry in {wait:.2f} s",
                    retry_after_s=max(1, int(wait + 0.999)),
                )
            buckets[who] = (tokens - 1.0, now)


def _key_index(given: bytes, keys: tuple[bytes, ...]) -> int:
    """Index of ``given`` among ``keys`` (-1 if none), comparing against every key in constant time."""
    found = -1
    for i, key in enumerate(keys):
        if hmac.compare_digest(given, key):
            found = i
    return found


def _bearer_token(request: Request) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, else None (as ``HTTPBearer(auto_error=False)``)."""
    return bearer_token(request.headers.get("Authorization"))


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization`` value ``Bearer <token>`` (HTTP header or gRPC metadata), else None."""
    if not authorization:
        return None
    scheme, credentials = get_authorization_scheme_param(authorization)
    if not (scheme and credentials) or scheme.lower() != "bearer":
        return None
    return credentials


def identify_caller(request: Request, settings: Settings, limiter: RateLimiter | None) -> str:
    """When API_KEYS is set, the request must carry one of them; returns the caller identity for rate limiting.

    Raises:
        UnauthorizedError: keys are configured and the request carries none of them.
        RateLimitedError: the caller's rate limit is exhausted.
    """
    return caller_identity(_bearer_token(request), client_address(request), settings, limiter)


def caller_identity(token: str | None, address: str, settings: Settings, limiter: RateLimiter | None) -> str:
    """The API-key check and rate limit of any transport: ``key<i>`` with API keys, else the client ``address``.

    Raises:
        UnauthorizedError: keys are configured and ``token`` (the bearer token, None if absent) is none of them.
        OverloadedError: the caller's rate limit is exhausted.
    """
    keys = settings.api_key_values()
    if keys:
        if token is None:
            raise UnauthorizedError("missing API key: send 'Authorization: Bearer <key>'")
        idx = _key_index(token.encode(), keys)
        if idx < 0:
            raise UnauthorizedError("wrong API key")
        who = f"key{idx}"
    else:
        who = address
    if limiter is not None:
        limiter.take(who)
    return who


@dataclass(frozen=True, slots=True)
class Served:
    """What an inference route needs, resolved once per request by :data:`ServedDep`."""

    settings: Settings
    holder: ModelHolder
    metrics: Metrics
    #: caller identity for rate limiting: ``key<i>`` with API keys, else the client address
    caller: str


class ApiKeyScheme(SecurityBase):
    """The API-key check (bearer), the per-key rate limit and the app state, as one dependency.

    A :class:`SecurityBase` with the model and name of ``HTTPBearer(description=...)``, so the OpenAPI document
    declares the same ``HTTPBearer`` security scheme on the routes that use it, while FastAPI solves one
    dependency per request instead of a bearer, a key check and one per piece of state.
    """

    def __init__(self) -> None:
        self.model = HTTPBearerModel(description=_BEARER_DESCRIPTION)
        self.scheme_name = "HTTPBearer"

    async def __call__(self, request: Request) -> Served:
        state = request.app.state
        settings: Settings = state.settings
        who = identify_caller(request, settings, state.rate_limiter)
        return Served(settings, state.holder, state.metrics, who)


#: the admin routes' limit per client address when MIXINFER_RATE_LIMIT_PER_KEY is unset: a hot swap now and then
#: passes, guessing the admin key does not
ADMIN_RATE_PER_S = 1.0
ADMIN_BURST = 10.0


def admin_limiter(settings: Settings) -> RateLimiter:
    """The admin routes' limiter, per client address: MIXINFER_RATE_LIMIT_PER_KEY when set, else
    :data:`ADMIN_RATE_PER_S` with bursts of :data:`ADMIN_BURST`."""
    if settings.rate_limit_per_key is not None:
        return RateLimiter(settings.rate_limit_per_key, per="client address")
    return RateLimiter(ADMIN_RATE_PER_S, burst=ADMIN_BURST, per="client address")


async def require_admin(request: Request, settings: SettingsDep, creds: Bearer) -> None:
    """Admin routes: 403 when no ADMIN_KEY is configured, 401 without a key; a request that presents a key is
    rate-limited per client address before the key is compared (guessing is throttled), then 401 for a wrong key
    and 403 for a valid API key (which never authorises admin).

    Raises:
        RateLimitedError: this client address is over the admin limit (429).
    """
    check_admin_key(
        creds.credentials if creds is not None else None,
        client_address(request),
        settings,
        request.app.state.admin_limiter,
    )


def check_admin_key(token: str | None, address: str, settings: Settings, limiter: RateLimiter) -> None:
    """The admin-key rule of any transport (see :func:`require_admin`); ``token`` is the bearer token, None if
    absent, and ``address`` the client address whose guesses ``limiter`` throttles.

    Raises:
        ForbiddenError: no admin key configured, or an API key presented.
        UnauthorizedError: no key or a wrong key.
        RateLimitedError: this client address is over the admin limit.
    """
    admin_key = settings.admin_key_value()
    if admin_key is None:
        raise ForbiddenError("admin routes are disabled: the server runs without MIXINFER_ADMIN_KEY")
    if token is None:
        raise UnauthorizedError("missing admin key: send 'Authorization: Bearer <admin key>'")
    limiter.take(address)
    given = token.encode()
    if hmac.compare_digest(given, admin_key):
        return
    if _key_index(given, settings.api_key_values()) >= 0:
        raise ForbiddenError("this key does not authorise admin routes: it is an API key, not the admin key")
    raise UnauthorizedError("wrong admin key")


def resolve_mode(requested: Mode | None, settings: Settings) -> Mode:
    """The mode to serve: combined unless the client asks for another one AND the server allows overrides."""
    if requested is None or requested is Mode.COMBINED:
        return Mode.COMBINED
    if not settings.allow_mode_override:
        raise ForbiddenError(
            f"mode={requested.value} refused: this server serves mode=combined only (MIXINFER_ALLOW_MODE_OVERRIDE "
            "is false), because other modes weaken the defence and mode=off hands out the undefended model"
        )
    return requested


#: the scheme instance: a dependency of the OIP v2 model routes, awaited by hand in /predict (see there)
API_KEY = ApiKeyScheme()
ServedDep = Annotated[Served, Depends(API_KEY)]
AdminDep = Annotated[None, Depends(require_admin)]

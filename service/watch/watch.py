"""The query-attack watch: near-copy hits per client and service-wide, and the policy that acts on them.

A *hit* is a query (one image) that shares at least ``FingerprintParams.match`` window hashes with an earlier
query of the same client in the window, or an exact resend of one image beyond ``resends`` resends (averaging
the server's randomness by resending is how an attacker beats MI). A client is *suspect* while it has at least
``ban_hits`` hits in the window. ``reject`` refuses every query that is a hit of its client; ``ban`` refuses every
query of a suspect client for ``ban_s`` seconds. Hits against other clients' queries (attacks spread over many
keys) are counted service-wide, for metrics and alerts only.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

from service.watch.fingerprint import FingerprintParams, digest, fingerprint, to_pixels
from service.watch.history import BYTES_PER_QUERY, Entry, QueryHistory

LOGGER = logging.getLogger(__name__)

MiB = 1024 * 1024
#: memory of one tracked client (hit times, ban; only clients with hits are tracked): tracemalloc measured 0.9 KB
#: with an IPv6 address as its name (``tests/unit/test_query_watch_bounds.py`` holds the cap to it)
BYTES_PER_CLIENT = 1_024
#: the share of ``MIXINFER_QUERY_WATCH_MAX_MB`` for the clients table (the rest holds queries)
CLIENTS_SHARE = 0.125


class Policy(enum.StrEnum):
    """What the watch does (``MIXINFER_QUERY_WATCH``)."""

    OFF = "off"
    OBSERVE = "observe"
    REJECT = "reject"
    BAN = "ban"


class Action(enum.Enum):
    """What happens to one request."""

    ANSWER = "answer"
    REJECT = "reject"
    BANNED = "banned"


@dataclass(frozen=True)
class WatchConfig:
    """The watch's settings (``MIXINFER_QUERY_WATCH_*``) and fingerprint parameters."""

    policy: Policy = Policy.OBSERVE
    window_s: float = 600.0
    max_mb: float = 64.0
    resends: int = 3
    ban_hits: int = 10
    ban_s: float = 600.0
    params: FingerprintParams = field(default_factory=FingerprintParams)

    @property
    def max_queries(self) -> int:
        """How many queries the memory cap holds (its share of ``max_mb`` over the measured bytes per query)."""
        return max(1, int(self.max_mb * MiB * (1.0 - CLIENTS_SHARE)) // BYTES_PER_QUERY)

    @property
    def max_clients(self) -> int:
        """How many clients with hits are tracked at once (the least recently seen beyond it are forgotten)."""
        return max(1, int(self.max_mb * MiB * CLIENTS_SHARE) // BYTES_PER_CLIENT)


@dataclass(frozen=True, slots=True)
class Verdict:
    """The watch's view of one request."""

    action: Action
    #: images of this request that are hits of their client
    hits: int
    #: images of this request that near-copy an earlier query of any client
    service_hits: int
    #: the client's hits in the window, this request's included
    client_hits: int
    #: exact digests of the images recorded (none when refused as banned): what :meth:`QueryWatch.unanswered` takes
    digests: tuple[bytes, ...] = ()


@dataclass(slots=True)
class _Client:
    hit_times: deque[float]
    banned_until: float = 0.0
    #: every hit since the client was first tracked (the evaluation reads it query by query)
    total_hits: int = 0


class QueryWatch:
    """Fingerprints every image a client sends and decides, per request, whether to answer it.

    Thread-safe (one lock): the server calls it on the event loop for small requests and on a worker thread for
    large ones.
    """

    def __init__(self, config: WatchConfig) -> None:
        self.config = config
        self.history = QueryHistory(config.window_s, config.max_queries)
        self._clients: dict[str, _Client] = {}
        self._lock = threading.Lock()
        #: images that near-copied another client's earlier query, since start (the evaluation reads it)
        self.service_hits = 0

    def check(self, client: str, images: NDArray[np.floating], now: float | None = None) -> Verdict:
        """Record the images (N, ...) of one request from ``client`` and return what to do with it."""
        cfg = self.config
        now = time.monotonic() if now is None else now
        prints = [_print(img, cfg.params) for img in images]  # outside the lock: pure numpy
        digests = tuple(exact for _, exact in prints)
        with self._lock:
            known = self._clients.get(client)
            if cfg.policy is Policy.BAN and known is not None and known.banned_until > now:
                return Verdict(Action.BANNED, 0, 0, len(known.hit_times))
            self.history.forget_before(now)
            hits = service_hits = 0
            hit_entries: list[Entry] = []
            for hashes, exact in prints:
                entry = self.history.resend(client, exact)
                if entry is not None:
                    # a refused near-copy stays refused: sending it again is no retry to answer
                    hit = entry.resends > cfg.resends or entry.refused
                    service_hit = False
                else:
                    needed = -(-cfg.params.match * len(hashes) // cfg.params.top)  # the same share of fewer hashes
                    found = self.history.match(client, hashes, needed)
                    hit, service_hit = found.own, found.anyone
                    entry = self.history.add(now, client, hashes, exact)
                if hit:
                    hit_entries.append(entry)
                hits += hit
                service_hits += service_hit
            self.service_hits += service_hits
            if not hits and known is None:  # only clients with hits are tracked (bounded by the memory cap)
                return Verdict(Action.ANSWER, 0, service_hits, 0, digests)
            state = self._client(client)
            times = state.hit_times
            horizon = now - cfg.window_s
            while times and times[0] < horizon:
                times.popleft()
            times.extend([now] * hits)
            state.total_hits += hits
            window_hits = len(times)
            action = Action.ANSWER
            if hits and cfg.policy is Policy.REJECT:
                action = Action.REJECT
            elif cfg.policy is Policy.BAN and hits and len(times) >= cfg.ban_hits:
                state.banned_until = now + cfg.ban_s
                times.clear()  # the ban spends these hits: after it the client starts afresh
                action = Action.BANNED
                window_hits = cfg.ban_hits
            if action is not Action.ANSWER:
                for entry in hit_entries:
                    entry.refused = True
        if hits:
            _log_hits(client, hits, window_hits, cfg, action)
        return Verdict(action, hits, service_hits, window_hits, digests)

    def unanswered(self, client: str, digests: tuple[bytes, ...]) -> None:
        """The server did not answer a request :meth:`check` recorded (overloaded, timed out, the client gone):
        its images do not count as sent, so a client's retry of it is not a resend. Hits it made stay counted."""
        with self._lock:
            for exact in digests:
                self.history.unsend(client, exact)

    def banned(self, client: str, now: float | None = None) -> bool:
        """Whether ``client`` is banned now (policy ``ban``): cheap, so a server asks before reading the body."""
        if self.config.policy is not Policy.BAN:
            return False
        now = time.monotonic() if now is None else now
        with self._lock:
            state = self._clients.get(client)
            return state is not None and state.banned_until > now

    def suspects(self, now: float | None = None) -> int:
        """Clients with at least ``ban_hits`` hits in the window (or banned) now."""
        now = time.monotonic() if now is None else now
        horizon = now - self.config.window_s
        need = self.config.ban_hits
        with self._lock:
            return sum(
                1
                for c in self._clients.values()
                if c.banned_until > now or sum(1 for t in c.hit_times if t >= horizon) >= need
            )

    def hits_of(self, client: str) -> int:
        """Every hit of ``client`` since it was first tracked (0 for an unknown client)."""
        with self._lock:
            state = self._clients.get(client)
            return 0 if state is None else state.total_hits

    def tracked_clients(self) -> int:
        """Clients tracked now (those with hits or a ban, at most ``config.max_clients``)."""
        with self._lock:
            return len(self._clients)

    def tracked(self) -> int:
        """Queries in the history now."""
        with self._lock:
            return len(self.history)

    def _client(self, client: str) -> _Client:
        state = self._clients.pop(client, None)  # pop + insert keeps the dict in least-recently-seen order
        if state is None:
            if len(self._clients) >= self.config.max_clients:
                del self._clients[next(iter(self._clients))]
            state = _Client(deque(maxlen=max(self.config.ban_hits, 1) * 4))
        self._clients[client] = state
        return state


def _print(image: NDArray[np.floating], params: FingerprintParams) -> tuple[list[int], bytes]:
    pixels = to_pixels(image)
    return fingerprint(pixels, params).tolist(), digest(pixels)


def _log_hits(client: str, hits: int, window_hits: int, cfg: WatchConfig, action: Action) -> None:
    """One line at the first hit, when the client turns suspect, every 100th hit, and on every refusal."""
    before = window_hits - hits
    crossed = before < cfg.ban_hits <= window_hits
    if action is not Action.ANSWER or before == 0 or crossed or window_hits // 100 > before // 100:
        LOGGER.warning(
            "query watch: client %s sent %d near-copy or resent image(s); %d hits in the last %g s%s; action %s",
            client,
            hits,
            window_hits,
            cfg.window_s,
            " (suspect)" if window_hits >= cfg.ban_hits else "",
            action.value,
            extra={"client": client, "query_watch_hits": window_hits, "query_watch_action": action.value},
        )

"""The query watch on the request path: screen a request's images before the model runs (docs/query-watch.md)."""

from __future__ import annotations

import asyncio
import logging

import numpy as np
from numpy.typing import NDArray
from prometheus_client import CollectorRegistry

from service.config import Settings
from service.errors import ClientBannedError, QueryRejectedError
from service.watch.metrics import QueryWatchMetrics
from service.watch.watch import Action, Policy, QueryWatch, Verdict, WatchConfig

LOGGER = logging.getLogger(__name__)

#: fingerprint on the event loop up to this many pixel values in the request (~1 ms), on a worker thread above: the
#: cost follows the values (a sort of one hash per value), not the image count (one 224x224 RGB image ~ 30 ms)
INLINE_VALUES = 4 * 1024


class QueryScreen:
    """A :class:`QueryWatch` with its metrics; raises the policy's 403 for a refused request."""

    def __init__(self, watch: QueryWatch, registry: CollectorRegistry) -> None:
        self.watch = watch
        self.metrics = QueryWatchMetrics(watch, registry)

    @classmethod
    def from_settings(cls, settings: Settings, registry: CollectorRegistry) -> QueryScreen | None:
        """The screen ``MIXINFER_QUERY_WATCH*`` asks for, or None when the watch is off."""
        policy = Policy(settings.query_watch)
        if policy is Policy.OFF:
            return None
        config = WatchConfig(
            policy=policy,
            window_s=settings.query_watch_window_s,
            max_mb=settings.query_watch_max_mb,
            resends=settings.query_watch_resends,
            ban_hits=settings.query_watch_ban_hits,
            ban_s=settings.query_watch_ban_s,
        )
        LOGGER.info(
            "query watch: policy %s, window %g s, memory cap %g MiB (%d queries)",
            policy.value,
            config.window_s,
            config.max_mb,
            config.max_queries,
        )
        return cls(QueryWatch(config), registry)

    def refuse_banned(self, caller: str) -> None:
        """Refuse a banned caller before its body is read or decoded (a ban costs the server nothing more).

        Raises:
            ClientBannedError: policy ``ban`` and ``caller`` is banned now.
        """
        if self.watch.banned(caller):
            self.metrics.refused(Action.BANNED)
            raise self._banned_error()

    async def screen(self, caller: str, images: NDArray[np.float32]) -> Verdict:
        """Record the request's images for ``caller``; the verdict lets :meth:`unanswered` take them back.

        Raises:
            QueryRejectedError: policy ``reject`` and an image near-copies this caller's earlier queries.
            ClientBannedError: policy ``ban`` and the caller is (now) suspect.
        """
        if images.size <= INLINE_VALUES:
            verdict = self.watch.check(caller, images)
        else:
            verdict = await asyncio.to_thread(self.watch.check, caller, images)
        self.metrics.observe(len(images), verdict)
        if verdict.action is Action.REJECT:
            raise QueryRejectedError(
                "query refused: it nearly repeats earlier queries of this client, as black-box attacks do"
            )
        if verdict.action is Action.BANNED:
            raise self._banned_error()
        return verdict

    def unanswered(self, caller: str, verdict: Verdict) -> None:
        """The request screened with ``verdict`` got no answer: a retry of it is not a resend."""
        self.watch.unanswered(caller, verdict.digests)

    def _banned_error(self) -> ClientBannedError:
        return ClientBannedError(
            f"client refused for up to {self.watch.config.ban_s:g} s: too many of its queries nearly repeat "
            "each other, as black-box attacks do"
        )

"""The query watch's Prometheus series: totals only, never a per-client label (cardinality, privacy)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

from service.watch.watch import Action, QueryWatch, Verdict


class QueryWatchMetrics:
    """Hits, refusals, suspect clients and history size of one :class:`QueryWatch`, in the app's registry."""

    def __init__(self, watch: QueryWatch, registry: CollectorRegistry) -> None:
        hits = Counter(
            "mixinfer_query_watch_hits",
            "Images that near-copy (or resend beyond the allowance) an earlier query: of the same client, "
            "or of any client (service-wide)",
            ["scope"],
            registry=registry,
        )
        self._client_hits = hits.labels(scope="client")
        self._service_hits = hits.labels(scope="service")
        self.images = Counter("mixinfer_query_watch_images", "Images the query watch fingerprinted", registry=registry)
        refused = Counter(
            "mixinfer_query_watch_refusals",
            "Requests the query watch refused, by reason (query_rejected, client_banned)",
            ["reason"],
            registry=registry,
        )
        self._refused = {
            Action.REJECT: refused.labels(reason="query_rejected"),
            Action.BANNED: refused.labels(reason="client_banned"),
        }
        Gauge(
            "mixinfer_query_watch_suspect_clients",
            "Clients with at least MIXINFER_QUERY_WATCH_BAN_HITS hits in the window (or banned) now",
            registry=registry,
        ).set_function(watch.suspects)
        Gauge(
            "mixinfer_query_watch_history_queries", "Queries the watch remembers now", registry=registry
        ).set_function(watch.tracked)
        Gauge(
            "mixinfer_query_watch_history_capacity_queries",
            "Queries the memory cap (MIXINFER_QUERY_WATCH_MAX_MB) holds",
            registry=registry,
        ).set(watch.config.max_queries)

    def observe(self, images: int, verdict: Verdict) -> None:
        self.images.inc(images)
        if verdict.hits:
            self._client_hits.inc(verdict.hits)
        if verdict.service_hits:
            self._service_hits.inc(verdict.service_hits)
        self.refused(verdict.action)

    def refused(self, action: Action) -> None:
        """Count a request refused with ``action`` (nothing for :attr:`Action.ANSWER`)."""
        counter = self._refused.get(action)
        if counter is not None:
            counter.inc()

"""A bounded history of query fingerprints with an inverted index: which earlier queries share enough hashes."""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass
from itertools import chain

#: memory of one tracked query with the default fingerprint (20 hashes): tracemalloc measured 2.0 KB per query over
#: 5,000 MNIST digits (``bench/query_watch.py`` prints it) but 3.4 KB for noise images, whose hashes are all distinct
#: index keys (the worst case, what an attacker sends); the memory cap counts 4,000 bytes
BYTES_PER_QUERY = 4_000
#: an index list keeps the most recent queries that hold one hash; older ones no longer match through it. An
#: attack's near-copies follow each other, so the last few suffice, and a hash many queries hold is background
#: (blank windows) whose long lists would only cost time
MAX_POSTINGS = 8


@dataclass(slots=True)
class Entry:
    """One remembered query."""

    time: float
    client: str
    hashes: list[int]
    digest: bytes
    #: exact resends of this image by this client after the first send (-1: the first send was not answered)
    resends: int = 0
    #: the image was a hit in a request the policy refused: every resend of it is a hit too (no retry allowance)
    refused: bool = False


@dataclass(frozen=True, slots=True)
class Match:
    """The near-copies of one query among the remembered ones."""

    #: some earlier query of the same client shares ``match`` hashes or more
    own: bool
    #: some earlier query of any client shares ``match`` hashes or more
    anyone: bool


class QueryHistory:
    """Fingerprints of recent queries, forgotten after ``window_s`` seconds or beyond ``max_queries``.

    Not thread-safe: :class:`service.watch.watch.QueryWatch` holds the lock.
    """

    def __init__(self, window_s: float, max_queries: int) -> None:
        if window_s <= 0 or max_queries < 1:
            raise ValueError(f"window_s must be > 0 and max_queries >= 1, got {window_s} and {max_queries}")
        self.window_s = window_s
        self.max_queries = max_queries
        self._entries: dict[int, Entry] = {}
        self._order: deque[int] = deque()
        self._index: dict[int, list[int]] = {}
        self._exact: dict[tuple[str, bytes], int] = {}
        self._next_id = 0

    def __len__(self) -> int:
        return len(self._entries)

    def forget_before(self, now: float) -> None:
        """Drop queries older than the window, then the oldest ones beyond ``max_queries``."""
        horizon = now - self.window_s
        order, entries = self._order, self._entries
        while order and (entries[order[0]].time < horizon or len(order) > self.max_queries):
            self._drop(order.popleft())

    def resend(self, client: str, digest: bytes) -> Entry | None:
        """Count an exact resend of an image this client sent within the window: its entry, or None."""
        eid = self._exact.get((client, digest))
        if eid is None:
            return None
        entry = self._entries[eid]
        entry.resends += 1
        return entry

    def unsend(self, client: str, digest: bytes) -> None:
        """Take back one send of an image by ``client`` (the server did not answer it): its retry is no resend."""
        eid = self._exact.get((client, digest))
        if eid is not None:
            self._entries[eid].resends -= 1

    def match(self, client: str, hashes: list[int], needed: int) -> Match:
        """Whether an earlier query of ``client`` / of anyone shares at least ``needed`` of ``hashes``.

        ``needed`` is for a full fingerprint of ``top`` hashes: a query with fewer distinct windows (a tiny or
        blank image) needs the same share of its own hashes.
        """
        index = self._index
        shared = Counter(chain.from_iterable([ids for h in hashes if (ids := index.get(h)) is not None]))
        own = anyone = False
        for eid, n in shared.items():
            if n >= needed:
                anyone = True
                if self._entries[eid].client == client:
                    own = True
                    break
        return Match(own=own, anyone=anyone)

    def add(self, now: float, client: str, hashes: list[int], digest: bytes) -> Entry:
        """Remember a query (call :meth:`forget_before` first so that the bounds hold); returns its entry."""
        eid = self._next_id
        self._next_id += 1
        entry = self._entries[eid] = Entry(now, client, hashes, digest)
        self._order.append(eid)
        self._exact[(client, digest)] = eid
        index = self._index
        for h in hashes:
            ids = index.get(h)
            if ids is None:
                index[h] = [eid]
            else:
                ids.append(eid)
                if len(ids) > MAX_POSTINGS:
                    del ids[0]
        if len(self._order) > self.max_queries:
            self._drop(self._order.popleft())
        return entry

    def _drop(self, eid: int) -> None:
        entry = self._entries.pop(eid)
        key = (entry.client, entry.digest)
        if self._exact.get(key) == eid:
            del self._exact[key]
        index = self._index
        for h in entry.hashes:
            ids = index.get(h)
            if ids and ids[0] == eid:
                del ids[0]
                if not ids:
                    del index[h]

"""Hostile bounds of the query watch (outside review): the memory cap holds for the worst images and any number of
clients, and large images are fingerprinted off the event loop."""

from __future__ import annotations

import asyncio
import threading
import tracemalloc

import numpy as np
from prometheus_client import CollectorRegistry

from service.api.query_watch import QueryScreen
from service.watch.watch import MiB, Policy, QueryWatch, WatchConfig


def traced_bytes(run) -> int:
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        run()
        return tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()


def test_the_memory_cap_holds_for_high_entropy_images_from_distinct_clients(caplog):
    caplog.set_level("ERROR", logger="service.watch.watch")  # no log record kept by pytest counts here
    # noise images have no repeated window: every one of a query's hashes is a new index key (the worst case), and
    # every query from its own address with one hit each (an attacker rotating IPv6 addresses) makes a client entry
    config = WatchConfig(policy=Policy.OBSERVE, max_mb=1.0)
    watch = QueryWatch(config)
    rng = np.random.default_rng(0)
    queries = config.max_queries + 200  # past the cap: the oldest go
    images = rng.random((queries, 1, 28, 28), dtype=np.float32)

    def fill() -> None:
        for i in range(queries):
            client = f"2001:db8::{i:x}"
            watch.check(client, images[i : i + 1], now=float(i))
            watch.check(client, images[i : i + 1] * 0.999, now=float(i))  # an exact resend: no new entry

    used = traced_bytes(fill)
    assert len(watch.history) <= config.max_queries
    assert watch.tracked_clients() == config.max_clients  # every query made its client a hit: the table is full
    assert used <= config.max_mb * MiB, f"{used / MiB:.2f} MiB used for a cap of {config.max_mb} MiB"


def test_clients_without_hits_are_not_tracked():
    watch = QueryWatch(WatchConfig(policy=Policy.OBSERVE))
    rng = np.random.default_rng(1)
    for i in range(50):
        watch.check(f"10.0.0.{i}", rng.random((1, 1, 28, 28), dtype=np.float32), now=float(i))
    assert watch.hits_of("10.0.0.1") == 0
    assert watch.tracked_clients() == 0


class ThreadRecordingWatch(QueryWatch):
    def __init__(self, config: WatchConfig) -> None:
        super().__init__(config)
        self.threads: list[int] = []

    def check(self, client, images, now=None):
        self.threads.append(threading.get_ident())
        return super().check(client, images, now)


def screened_on_loop_thread(images: np.ndarray) -> bool:
    watch = ThreadRecordingWatch(WatchConfig(policy=Policy.OBSERVE))
    screen = QueryScreen(watch, CollectorRegistry())

    async def main() -> int:
        await screen.screen("c", images)
        return threading.get_ident()

    loop_thread = asyncio.run(main())
    return watch.threads == [loop_thread]


def test_large_images_are_fingerprinted_off_the_event_loop():
    rng = np.random.default_rng(2)
    # one 224x224 RGB image costs tens of ms to fingerprint (the sort of ~150k window hashes): never on the loop
    assert not screened_on_loop_thread(rng.random((1, 3, 224, 224), dtype=np.float32))
    # a few small images (the default bundle's 28x28) stay on the loop: cheaper than a thread hop
    assert screened_on_loop_thread(rng.random((2, 1, 28, 28), dtype=np.float32))

"""The micro-batcher under a storm of everything at once: concurrent submits of 1..9 images, cancellations,
deadlines from 1 ms up, client withdrawals, hot swaps of the pin and an engine that fails every batch holding a
marked image. Whatever the interleaving, every request ends (no stuck future), each answer is its own images'
rows from exactly the version it reports, no answer holds a marked image, and afterwards the queue, its gauge
and the in-flight count are back at 0 and the idle fast path still answers."""

from __future__ import annotations

import asyncio
import random
import time

import numpy as np
import pytest

from service.batching import MicroBatcher, WithdrawnError
from service.errors import DeadlineExceededError, OverloadedError
from service.mi.engine import MIResult
from service.mi.params import Branch, Mode

VERSION_STRIDE = 100_000  # label = image id + VERSION_STRIDE * pinned version


def _marked(i: int) -> bool:
    return i % 97 == 13


class _Gauge:
    def __init__(self) -> None:
        self.values: list[int] = []

    def queue_changed(self, images: int) -> None:
        self.values.append(images)

    def batch_started(self, images: int, waited_s: list[float]) -> None:
        return None


def _engine(pinned: int, x: np.ndarray, mode: Mode) -> MIResult:
    ids = x[:, 0, 0, 0].astype(np.int64)
    time.sleep(random.random() * 0.002)
    if any(_marked(int(i)) for i in ids):
        raise RuntimeError("engine failed on a marked image")
    b = len(ids)
    return MIResult(
        label=ids + VERSION_STRIDE * pinned,
        probs=np.zeros((b, 3), np.float32),
        clean_probs=np.zeros((b, 3), np.float32),
        gap=np.zeros(b, np.float32),
        flagged=np.zeros(b, bool),
        branch=(Branch.PL,) * b,
        n_mixes=np.full(b, 5, np.int64),
    )


async def _storm(seed: int, clients: int) -> tuple[dict[str, int], tuple[int, int, int]]:
    """Outcome counts, and (queued images, in-flight batches, last gauge value) once the storm has drained."""
    rng = random.Random(seed)
    version = {"now": 1}
    gauge = _Gauge()
    batcher: MicroBatcher[int] = MicroBatcher(
        _engine, pin=lambda: version["now"], max_batch_images=4, max_delay_s=0.003, max_queue_images=40, observer=gauge
    )
    batcher.start()
    loop = asyncio.get_running_loop()
    outcomes: dict[str, int] = {}
    next_id = [0]

    async def client() -> None:
        n = rng.choice([1, 1, 2, 3, 5, 9])
        ids = list(range(next_id[0], next_id[0] + n))
        next_id[0] += n
        x = np.stack([np.full((1, 2, 2), i, np.float32) for i in ids])
        leave: asyncio.Future[None] | None = None
        if rng.random() < 0.2:
            leave = loop.create_future()
            loop.call_later(rng.random() * 0.01, lambda f=leave: f.done() or f.set_result(None))
        deadline = time.monotonic() + rng.choice([0.001, 0.005, 0.02, 2.0, 2.0])
        try:
            pinned, res = await batcher.submit(x, rng.choice([Mode.COMBINED, Mode.PL]), deadline, withdraw_on=leave)
        except (DeadlineExceededError, WithdrawnError, OverloadedError, RuntimeError) as exc:
            outcomes[type(exc).__name__] = outcomes.get(type(exc).__name__, 0) + 1
            return
        assert {int(v) // VERSION_STRIDE for v in res.label} == {pinned}  # one version, the one reported
        assert [int(v) % VERSION_STRIDE for v in res.label] == ids  # its own rows, in order
        assert not any(_marked(i) for i in ids)  # a failed piece fails its whole request
        outcomes["answered"] = outcomes.get("answered", 0) + 1

    tasks = []
    for _ in range(clients):
        task = asyncio.create_task(client())
        tasks.append(task)
        roll = rng.random()
        if roll < 0.05:
            loop.call_later(rng.random() * 0.005, task.cancel)
        elif roll > 0.99:
            version["now"] += 1  # a hot swap
        if rng.random() < 0.3:
            await asyncio.sleep(rng.random() * 0.002)
    async with asyncio.timeout(60):  # a stuck future fails here
        results = await asyncio.gather(*tasks, return_exceptions=True)
    unexpected = [r for r in results if isinstance(r, BaseException) and not isinstance(r, asyncio.CancelledError)]
    assert unexpected == []
    outcomes["cancelled"] = sum(isinstance(r, asyncio.CancelledError) for r in results)
    await asyncio.sleep(0.05)  # batches whose every piece was answered already finish
    drained = (batcher.queued_images, batcher.inflight_batches, gauge.values[-1])
    _, res = await batcher.submit(np.full((1, 1, 2, 2), 1, np.float32), Mode.PL, time.monotonic() + 5)
    assert res.label.tolist() == [1 + VERSION_STRIDE * version["now"]]
    async with asyncio.timeout(10):
        await batcher.close()
    return outcomes, drained


@pytest.mark.parametrize("seed", [0, 1])
def test_a_storm_of_submits_cancels_deadlines_withdrawals_swaps_and_failures_leaves_nothing_behind(seed: int) -> None:
    outcomes, drained = asyncio.run(_storm(seed, clients=800))
    assert drained == (0, 0, 0)  # no image left queued, no slot held, the queue gauge back at 0
    for kind in ("answered", "DeadlineExceededError", "RuntimeError", "cancelled"):
        assert outcomes.get(kind, 0) > 0, f"the storm never produced {kind}: {outcomes}"  # it tested each path

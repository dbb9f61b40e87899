"""The micro-batcher with trivial numpy engines: batching rules, splitting, backpressure, deadlines, failures."""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import numpy as np
import pytest

from service.batching import MicroBatcher, WithdrawnError
from service.errors import DeadlineExceededError, NotReadyError, OverloadedError
from service.mi.engine import MIResult
from service.mi.params import Branch, Mode


def images(*ids: int) -> np.ndarray:
    """One (1,2,2) image per id, every pixel = id, so results can be traced back to inputs."""
    return np.stack([np.full((1, 2, 2), i, np.float32) for i in ids])


class Engine:
    """Records every batch; label = the image's pixel value; optionally held by a gate or failing on a value."""

    def __init__(self, gated: bool = False, fail_on: int | None = None, stepped: bool = False) -> None:
        self.calls: list[tuple[list[int], Mode]] = []
        self.pins: list[str] = []  # what each call was pinned to
        self.gate = threading.Event()
        self.started = threading.Event()
        self.steps = threading.Semaphore(0) if stepped else None  # stepped: one call per permit (``step``)
        if not gated:
            self.gate.set()
        self.fail_on = fail_on

    def step(self, calls: int = 1) -> None:
        assert self.steps is not None
        self.steps.release(calls)

    def __call__(self, pinned: str, x: np.ndarray, mode: Mode) -> MIResult:
        ids = x[:, 0, 0, 0].astype(np.int64)
        self.calls.append((ids.tolist(), mode))
        self.pins.append(pinned)
        self.started.set()
        assert self.gate.wait(10)
        if self.steps is not None:
            assert self.steps.acquire(timeout=10)
        if self.fail_on is not None and self.fail_on in ids:
            raise RuntimeError(f"engine failed on {self.fail_on}")
        b = len(ids)
        res = MIResult(
            label=ids,
            probs=np.zeros((b, 3), np.float32),
            clean_probs=np.zeros((b, 3), np.float32),
            gap=ids.astype(np.float32) / 100,
            flagged=np.zeros(b, bool),
            branch=(Branch.PL,) * b,
            n_mixes=np.full(b, 5, np.int64),
        )
        return res


def far() -> float:
    return time.monotonic() + 30


async def until(cond, limit_s: float = 5.0) -> None:
    end = time.monotonic() + limit_s
    while not cond():
        assert time.monotonic() < end, "condition not reached"
        await asyncio.sleep(0.002)


def make(engine: Engine, **kw) -> MicroBatcher:
    args = {"pin": lambda: "model-a", "max_batch_images": 4, "max_delay_s": 60.0, "max_queue_images": 64} | kw
    b = MicroBatcher(engine, **args)
    b.start()
    return b


def test_results_are_split_back_to_their_requests():
    async def main():
        eng = Engine()
        b = make(eng)
        outs = await asyncio.gather(*(b.submit(images(i, i + 100), Mode.COMBINED, far()) for i in range(6)))
        await b.close()
        return eng, outs

    eng, outs = asyncio.run(main())
    for i, (tag, res) in enumerate(outs):
        assert tag == "model-a"
        assert res.label.tolist() == [i, i + 100]
        np.testing.assert_allclose(res.gap, [i / 100, (i + 100) / 100])
        assert len(res.branch) == 2 and res.n_mixes.tolist() == [5, 5]
    assert sum(len(ids) for ids, _ in eng.calls) == 12
    assert all(len(ids) <= 4 for ids, _ in eng.calls)


def test_idle_engine_runs_at_once_without_waiting_for_the_delay():
    async def main():
        eng = Engine()
        b = make(eng, max_delay_s=60.0, max_batch_images=64)
        async with asyncio.timeout(5):
            _, res = await b.submit(images(7), Mode.COMBINED, far())
        await b.close()
        return res

    assert asyncio.run(main()).label.tolist() == [7]


def test_busy_engine_seals_a_full_batch_and_keeps_the_rest_queued():
    async def main():
        eng = Engine(gated=True)
        b = make(eng, max_batch_images=4, max_delay_s=60.0)
        first = asyncio.create_task(b.submit(images(0), Mode.COMBINED, far()))
        await until(eng.started.is_set)
        rest = [asyncio.create_task(b.submit(images(i), Mode.COMBINED, far())) for i in range(1, 6)]
        await until(lambda: b.queued_images == 1)  # 4 sealed behind the running batch, 1 waiting
        eng.gate.set()
        await asyncio.gather(first, *rest)
        await b.close()
        return eng

    eng = asyncio.run(main())
    assert [ids for ids, _ in eng.calls] == [[0], [1, 2, 3, 4], [5]]


def test_busy_engine_seals_after_the_delay_of_the_oldest_image():
    async def main():
        eng = Engine(gated=True)
        b = make(eng, max_batch_images=64, max_delay_s=0.02)
        first = asyncio.create_task(b.submit(images(0), Mode.COMBINED, far()))
        await until(eng.started.is_set)
        two = [asyncio.create_task(b.submit(images(i), Mode.COMBINED, far())) for i in (1, 2)]
        await until(lambda: b.inflight_batches == 2)  # sealed after ~20 ms although the batch is not full
        assert b.queued_images == 0
        late = asyncio.create_task(b.submit(images(3), Mode.COMBINED, far()))
        await asyncio.sleep(0.06)
        assert b.queued_images == 1  # one batch already waits: the late image joins the next one
        eng.gate.set()
        await asyncio.gather(first, *two, late)
        await b.close()
        return eng

    eng = asyncio.run(main())
    assert [ids for ids, _ in eng.calls] == [[0], [1, 2], [3]]


def test_full_queue_answers_503_overloaded_before_any_batch_completes():
    async def main():
        eng = Engine(gated=True)
        b = make(eng, max_batch_images=2, max_queue_images=4)
        tasks = [asyncio.create_task(b.submit(images(0), Mode.COMBINED, far()))]
        await until(eng.started.is_set)
        tasks += [asyncio.create_task(b.submit(images(1, 2), Mode.COMBINED, far()))]  # sealed (full)
        await until(lambda: b.inflight_batches == 2)
        tasks += [asyncio.create_task(b.submit(images(3, 4, 5, 6), Mode.COMBINED, far()))]  # fills the queue
        await until(lambda: b.queued_images == 4)
        with pytest.raises(OverloadedError, match="queue full: 4 images waiting, 1 more") as info:
            await b.submit(images(9), Mode.COMBINED, far())
        assert b.batches_done == 0 and info.value.retry_after_s >= 1
        eng.gate.set()
        await asyncio.gather(*tasks)
        await b.close()
        return eng

    eng = asyncio.run(main())
    assert sorted(i for ids, _ in eng.calls for i in ids) == [0, 1, 2, 3, 4, 5, 6]  # nothing accepted was lost


def test_deadline_gives_504_and_the_image_never_runs():
    async def main():
        eng = Engine(gated=True)
        b = make(eng, max_batch_images=1, max_queue_images=8)
        first = asyncio.create_task(b.submit(images(0), Mode.COMBINED, far()))
        await until(eng.started.is_set)
        second = asyncio.create_task(b.submit(images(1), Mode.COMBINED, far()))  # sealed behind the running one
        await until(lambda: b.inflight_batches == 2)
        with pytest.raises(DeadlineExceededError):
            await b.submit(images(2), Mode.COMBINED, time.monotonic() + 0.05)
        assert b.queued_images == 0
        eng.gate.set()
        await asyncio.gather(first, second)
        await b.close()
        return eng

    eng = asyncio.run(main())
    assert [ids for ids, _ in eng.calls] == [[0], [1]]


def test_a_client_that_leaves_does_not_poison_the_batch():
    async def main():
        eng = Engine(gated=True)
        b = make(eng, max_batch_images=8)
        first = asyncio.create_task(b.submit(images(0), Mode.COMBINED, far()))
        await until(eng.started.is_set)
        stay = [asyncio.create_task(b.submit(images(i), Mode.COMBINED, far())) for i in (1, 3)]
        leave = asyncio.create_task(b.submit(images(2), Mode.COMBINED, far()))
        await until(lambda: b.queued_images == 3)
        leave.cancel()
        await until(lambda: b.queued_images == 2)
        eng.gate.set()
        outs = await asyncio.gather(first, *stay)
        await b.close()
        return eng, outs

    eng, outs = asyncio.run(main())
    assert [r.label.tolist() for _, r in outs] == [[0], [1], [3]]
    assert [ids for ids, _ in eng.calls] == [[0], [1, 3]]


def test_a_client_that_leaves_while_running_does_not_hurt_the_others():
    async def main():
        eng = Engine(gated=True)
        b = make(eng, max_batch_images=8)
        leave = asyncio.create_task(b.submit(images(1), Mode.COMBINED, far()))
        await until(eng.started.is_set)
        leave.cancel()
        stay = asyncio.create_task(b.submit(images(2), Mode.COMBINED, far()))
        eng.gate.set()
        _, res = await stay
        await b.close()
        return res

    assert asyncio.run(main()).label.tolist() == [2]


def test_an_idle_engine_gets_the_batch_without_a_loop_turn():
    async def main():
        eng = Engine(gated=True)
        b = make(eng)
        first = asyncio.create_task(b.submit(images(0), Mode.COMBINED, far()))
        await asyncio.sleep(0)  # the submit runs up to its first wait: it has sealed the batch itself
        sealed_at_once = b.inflight_batches
        eng.gate.set()
        await first
        await b.close()
        return sealed_at_once

    assert asyncio.run(main()) == 1


def test_withdraw_on_takes_queued_images_out_and_raises():
    async def main():
        eng = Engine(gated=True)
        b = make(eng, max_batch_images=8)
        first = asyncio.create_task(b.submit(images(0), Mode.COMBINED, far()))
        await until(eng.started.is_set)
        gone = asyncio.get_running_loop().create_future()
        leave = asyncio.create_task(b.submit(images(5, 6), Mode.COMBINED, far(), withdraw_on=gone))
        stay = asyncio.create_task(b.submit(images(7), Mode.COMBINED, far()))
        await until(lambda: b.queued_images == 3)
        gone.set_result(None)
        with pytest.raises(WithdrawnError):
            await leave
        assert b.queued_images == 1
        eng.gate.set()
        outs = await asyncio.gather(first, stay)
        await b.close()
        return eng, outs

    eng, outs = asyncio.run(main())
    assert [r.label.tolist() for _, r in outs] == [[0], [7]]
    assert [ids for ids, _ in eng.calls] == [[0], [7]]


def test_withdraw_while_running_drops_only_that_answer():
    async def main():
        eng = Engine(gated=True)
        b = make(eng, max_batch_images=2)
        gone = asyncio.get_running_loop().create_future()
        first = asyncio.create_task(b.submit(images(0), Mode.COMBINED, far()))
        await until(eng.started.is_set)
        both = [
            asyncio.create_task(b.submit(images(1), Mode.COMBINED, far(), withdraw_on=gone)),
            asyncio.create_task(b.submit(images(2), Mode.COMBINED, far())),
        ]
        await until(lambda: b.inflight_batches == 2)  # sealed together (full) behind the running batch
        gone.set_result(None)
        eng.gate.set()
        outs = await asyncio.gather(first, *both, return_exceptions=True)
        await b.close()
        return eng, outs

    eng, (first, leave, stay) = asyncio.run(main())
    assert isinstance(leave, WithdrawnError)
    assert first[1].label.tolist() == [0] and stay[1].label.tolist() == [2]
    assert [ids for ids, _ in eng.calls] == [[0], [1, 2]]


def test_a_deadline_already_passed_is_refused_before_queueing():
    async def main():
        eng = Engine()
        b = make(eng)
        with pytest.raises(DeadlineExceededError):
            await b.submit(images(1), Mode.COMBINED, time.monotonic() - 0.001)
        queued = b.queued_images
        await b.close()
        return eng, queued

    eng, queued = asyncio.run(main())
    assert queued == 0 and eng.calls == []


def odd(*ids: int) -> np.ndarray:
    """Like :func:`images` but (1,3,3): co-batched with (1,2,2) images, ``np.concatenate`` fails while sealing."""
    return np.stack([np.full((1, 3, 3), i, np.float32) for i in ids])


def test_a_failure_while_sealing_fails_those_pieces_releases_the_slot_and_keeps_the_fast_path(caplog):
    async def main():
        eng = Engine(gated=True)
        b = make(eng, max_batch_images=4)
        first = asyncio.create_task(b.submit(images(0), Mode.COMBINED, far()))
        await until(eng.started.is_set)
        # sealed together when the first batch finishes: concatenating (1,2,2) with (1,3,3) images fails
        bad = [asyncio.create_task(b.submit(x, Mode.COMBINED, far())) for x in (images(1), odd(2))]
        await until(lambda: b.queued_images == 2)
        eng.gate.set()
        async with asyncio.timeout(5):  # the pieces concerned fail at once, they do not wait for their deadline
            outs = await asyncio.gather(first, *bad, return_exceptions=True)
        await until(lambda: b.inflight_batches == 0)
        eng.gate.clear()
        eng.started.clear()
        later = asyncio.create_task(b.submit(images(3), Mode.COMBINED, far()))
        await asyncio.sleep(0)  # idle again: the request seals its batch itself, without a loop turn
        sealed_at_once = b.inflight_batches
        eng.gate.set()
        _, res = await later
        async with asyncio.timeout(5):
            await b.close()
        return eng, outs, sealed_at_once, res

    with caplog.at_level(logging.ERROR, logger="service.batching"):
        eng, (first, one, two), sealed_at_once, res = asyncio.run(main())
    assert first[1].label.tolist() == [0]
    assert isinstance(one, ValueError) and isinstance(two, ValueError)
    assert sealed_at_once == 1 and res.label.tolist() == [3]
    assert [ids for ids, _ in eng.calls] == [[0], [3]]
    sealing = [r for r in caplog.records if "seal" in r.getMessage()]
    assert sealing and sealing[0].exc_info is not None  # logged with its traceback


def test_a_failure_while_the_dispatcher_seals_keeps_it_alive_and_close_shuts_the_worker_down():
    async def main():
        eng = Engine(gated=True)
        b = make(eng, max_batch_images=8, max_delay_s=0.02)
        first = asyncio.create_task(b.submit(images(0), Mode.COMBINED, far()))
        await until(eng.started.is_set)
        # the engine is busy: the dispatcher seals these after the delay, and concatenating them fails
        bad = [asyncio.create_task(b.submit(x, Mode.COMBINED, far())) for x in (images(1), odd(2))]
        async with asyncio.timeout(5):
            outs = await asyncio.gather(*bad, return_exceptions=True)
        assert b.inflight_batches == 1  # only the running batch holds a slot
        # the dispatcher still runs the delay timer: this one is sealed behind the running batch
        late = asyncio.create_task(b.submit(images(4), Mode.COMBINED, far()))
        await until(lambda: b.inflight_batches == 2)
        eng.gate.set()
        done = await asyncio.gather(first, late)
        async with asyncio.timeout(5):
            await b.close()
        return outs, done, b

    outs, done, b = asyncio.run(main())
    assert all(isinstance(o, ValueError) for o in outs)
    assert [r.label.tolist() for _, r in done] == [[0], [4]]
    with pytest.raises(RuntimeError, match="shutdown"):  # close() shut the worker down
        b._executor.submit(int)


def test_large_requests_are_split_into_pieces_and_reassembled_in_order():
    async def main():
        eng = Engine()
        b = make(eng, max_batch_images=4)
        _, res = await b.submit(images(*range(10)), Mode.COMBINED, far())
        await b.close()
        return eng, res

    eng, res = asyncio.run(main())
    assert res.label.tolist() == list(range(10))
    assert all(len(ids) <= 4 for ids, _ in eng.calls)


def test_modes_never_share_a_batch():
    async def main():
        eng = Engine(gated=True)
        b = make(eng, max_batch_images=8)
        first = asyncio.create_task(b.submit(images(0), Mode.COMBINED, far()))
        await until(eng.started.is_set)
        mixed = [
            asyncio.create_task(b.submit(images(i), m, far()))
            for i, m in ((1, Mode.OFF), (2, Mode.COMBINED), (3, Mode.OFF), (4, Mode.COMBINED))
        ]
        await until(lambda: b.queued_images == 4)
        eng.gate.set()
        await asyncio.gather(first, *mixed)
        await b.close()
        return eng

    eng = asyncio.run(main())
    for ids, mode in eng.calls:
        assert all((i in (1, 3)) == (mode is Mode.OFF) for i in ids)
    assert sorted(i for ids, _ in eng.calls for i in ids) == [0, 1, 2, 3, 4]


def test_an_engine_error_fails_only_its_own_batch():
    async def main():
        eng = Engine(fail_on=13)
        b = make(eng, max_batch_images=1)
        with pytest.raises(RuntimeError, match="failed on 13"):
            await b.submit(images(13), Mode.COMBINED, far())
        _, res = await b.submit(images(14), Mode.COMBINED, far())
        await b.close()
        return res

    assert asyncio.run(main()).label.tolist() == [14]


def test_a_failed_piece_withdraws_the_pieces_of_its_request_still_queued():
    async def main():
        eng = Engine(fail_on=11, stepped=True)
        b = make(eng, max_batch_images=1)
        first = asyncio.create_task(b.submit(images(0), Mode.COMBINED, far()))
        await until(eng.started.is_set)
        big = asyncio.create_task(b.submit(images(10, 11, 12, 13, 14, 15), Mode.COMBINED, far()))
        await until(lambda: b.queued_images == 5)  # piece [10] sealed behind [0], the other five queued
        eng.step(3)  # [0] and [10] succeed, [11] fails; no permit is left for the pieces sealed meanwhile
        with pytest.raises(RuntimeError, match="failed on 11"):
            async with asyncio.timeout(5):
                await big
        queued_after_failure = b.queued_images
        eng.step(10)  # whatever was sealed already may run now: its answer is dropped
        _, res = await b.submit(images(20), Mode.COMBINED, far())
        await first
        await b.close()
        return eng, queued_after_failure, res

    eng, queued_after_failure, res = asyncio.run(main())
    ran = [i for ids, _ in eng.calls for i in ids]
    assert queued_after_failure == 0
    assert 14 not in ran and 15 not in ran  # still queued when [11] failed: withdrawn, never computed
    assert res.label.tolist() == [20]


def test_every_piece_of_a_request_runs_with_the_pin_it_was_admitted_under():
    async def main():
        eng = Engine(gated=True)
        current = {"model": "v1"}
        b = make(eng, max_batch_images=2, pin=lambda: current["model"])
        first = asyncio.create_task(b.submit(images(0, 1, 2, 3, 4, 5), Mode.COMBINED, far()))
        await until(eng.started.is_set)  # piece [0, 1] runs, [2, 3] sealed behind it, [4, 5] queued
        current["model"] = "v2"  # a hot swap
        second = asyncio.create_task(b.submit(images(6, 7), Mode.COMBINED, far()))
        await until(lambda: b.queued_images == 4)
        eng.gate.set()
        outs = await asyncio.gather(first, second)
        await b.close()
        return eng, outs

    eng, ((pin1, res1), (pin2, res2)) = asyncio.run(main())
    assert (pin1, res1.label.tolist()) == ("v1", [0, 1, 2, 3, 4, 5])
    assert (pin2, res2.label.tolist()) == ("v2", [6, 7])
    by_call = {tuple(ids): pin for (ids, _), pin in zip(eng.calls, eng.pins, strict=True)}
    assert by_call == {(0, 1): "v1", (2, 3): "v1", (4, 5): "v1", (6, 7): "v2"}  # pins never share a batch


def test_a_request_is_refused_when_its_pin_cannot_be_read():
    async def main():
        def not_ready() -> str:
            raise NotReadyError("still loading")

        b = make(Engine(), pin=not_ready)
        with pytest.raises(NotReadyError, match="still loading"):
            await b.submit(images(1), Mode.COMBINED, far())
        queued = b.queued_images
        await b.close()
        return queued

    assert asyncio.run(main()) == 0


def test_close_finishes_what_was_accepted():
    async def main():
        eng = Engine(gated=True)
        b = make(eng, max_batch_images=1)
        tasks = [asyncio.create_task(b.submit(images(i), Mode.COMBINED, far())) for i in range(3)]
        await until(eng.started.is_set)
        closing = asyncio.create_task(b.close())
        eng.gate.set()
        outs = await asyncio.gather(*tasks)
        await closing
        return outs

    assert [r.label.tolist() for _, r in asyncio.run(main())] == [[0], [1], [2]]


def test_inconsistent_limits_are_refused():
    with pytest.raises(ValueError, match="max_batch_images <= max_queue_images"):
        MicroBatcher(Engine(), pin=str, max_batch_images=8, max_delay_s=0.0, max_queue_images=4)

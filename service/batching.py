"""Async micro-batcher: a bounded queue of images, flushed into one engine call on a single worker thread.

Requests are split into pieces of at most ``max_batch_images`` images; pieces of the same mode are concatenated
in arrival order, run in ONE engine call off the event loop, and the result is split back by the recorded offsets
(the totals are checked). A batch is sealed at once when the engine is idle, or, while it is busy, as soon as it
holds ``max_batch_images`` images or its oldest image has waited ``max_delay_s``; at most one sealed batch waits
behind the running one, so images that arrive meanwhile join the next batch instead of a stale one.

Hand-off costs matter at a single client (the engine takes ~0.3 ms per image on the default bundle): whatever can
be sealed is sealed inline, by the request that arrives or the batch that finishes, and the dispatcher task only
wakes for the delay timer and for shutdown; the worker's result comes back with one ``call_soon_threadsafe``; a
request waits on its piece's own future, with its deadline and its withdrawal as callbacks on that future rather
than extra tasks.

A failure while sealing (joining the pieces, handing them to the worker) fails exactly the pieces of that batch,
takes no slot, is logged with its traceback and leaves the dispatcher running; :meth:`MicroBatcher.close` shuts
the worker down whatever happened.

One request, one model version: ``pin()`` is read when a request is admitted, every piece of the request carries
that value, a batch only joins pieces with the same pin, and ``run`` gets it (a hot swap changes what ``pin()``
returns; requests admitted before it finish on the old model). A piece that fails fails its whole request: its
sibling pieces still queued leave the queue, and a sealed batch whose pieces are all answered already is skipped.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

import numpy as np
from numpy.typing import NDArray

from service.errors import DeadlineExceededError, NotReadyError, OverloadedError
from service.mi.engine import MIResult
from service.mi.params import Mode

LOGGER = logging.getLogger(__name__)

#: what a request is pinned to when admitted (the model version that answers it), handed to ``run`` and returned
T = TypeVar("T")


class WithdrawnError(Exception):
    """The caller's ``withdraw_on`` future completed before the result (e.g. the client disconnected)."""


class BatchObserver(Protocol):
    """Hooks for metrics; every method is called on the event loop except where noted."""

    def queue_changed(self, images: int) -> None: ...

    def batch_started(self, images: int, waited_s: list[float]) -> None: ...


class _NullObserver:
    def queue_changed(self, images: int) -> None:
        return None

    def batch_started(self, images: int, waited_s: list[float]) -> None:
        return None


@dataclass(eq=False)
class _Piece:
    images: NDArray[np.float32]
    mode: Mode
    pin: Any
    future: asyncio.Future[MIResult]
    #: every piece of this piece's request (itself included): a failure of one fails them all
    request: list[_Piece] = field(default_factory=list)
    enqueued: float = field(default_factory=time.perf_counter)

    @property
    def n(self) -> int:
        return int(self.images.shape[0])


def slice_result(res: MIResult, start: int, stop: int) -> MIResult:
    """Rows [start, stop) of a batched result (partners are never requested by the HTTP layer)."""
    return MIResult(
        label=res.label[start:stop],
        probs=res.probs[start:stop],
        clean_probs=res.clean_probs[start:stop],
        gap=res.gap[start:stop],
        flagged=res.flagged[start:stop],
        branch=res.branch[start:stop],
        n_mixes=res.n_mixes[start:stop],
    )


def concat_results(parts: list[MIResult]) -> MIResult:
    """Concatenate per-piece results of one request back into one result, in order."""
    if len(parts) == 1:
        return parts[0]
    return MIResult(
        label=np.concatenate([p.label for p in parts]),
        probs=np.concatenate([p.probs for p in parts]),
        clean_probs=np.concatenate([p.clean_probs for p in parts]),
        gap=np.concatenate([p.gap for p in parts]),
        flagged=np.concatenate([p.flagged for p in parts]),
        branch=tuple(b for p in parts for b in p.branch),
        n_mixes=np.concatenate([p.n_mixes for p in parts]),
    )


class MicroBatcher(Generic[T]):
    """Bounded, image-counting micro-batcher in front of a synchronous engine call.

    Args:
        run: ``run(pinned, images (B,C,H,W) float32, mode) -> MIResult``; called on the worker thread, one at a
            time, with the value ``pin`` gave when the pieces' requests were admitted.
        pin: called on the loop when a request is admitted (e.g. the current model); may raise to refuse it.
        max_batch_images: images per engine call (a request with more is split into several pieces).
        max_delay_s: while the engine is busy, seal a batch once its oldest image has waited this long.
        max_queue_images: images waiting (not yet sealed) before new requests are refused with 503 (overloaded).
        observer: metric hooks.
    """

    def __init__(
        self,
        run: Callable[[T, NDArray[np.float32], Mode], MIResult],
        *,
        pin: Callable[[], T],
        max_batch_images: int,
        max_delay_s: float,
        max_queue_images: int,
        observer: BatchObserver | None = None,
    ) -> None:
        if max_batch_images < 1 or max_queue_images < max_batch_images:
            raise ValueError(
                f"need 1 <= max_batch_images <= max_queue_images, got {max_batch_images} and {max_queue_images}"
            )
        self._run = run
        self._pin = pin
        self.max_batch_images = max_batch_images
        self.max_delay_s = max_delay_s
        self.max_queue_images = max_queue_images
        self._observer: BatchObserver = observer or _NullObserver()
        self._queue: deque[_Piece] = deque()
        self._queued_images = 0
        self._inflight = 0  # sealed batches not finished: 0 idle, 1 running, 2 running + one waiting
        self._changed = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mixinfer-engine")
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self.batches_done = 0

    # --- public -----------------------------------------------------------------------------------------------
    @property
    def queued_images(self) -> int:
        """Images waiting, not yet sealed into a batch."""
        return self._queued_images

    @property
    def inflight_batches(self) -> int:
        """Sealed batches not finished: 0 idle, 1 running, 2 running + one waiting behind it."""
        return self._inflight

    def start(self) -> None:
        """Start the dispatcher task on the running loop."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._dispatch(), name="mixinfer-batcher")

    async def close(self) -> None:
        """Finish what was accepted, then stop (nothing accepted is lost)."""
        self._closed = True
        self._changed.set()
        try:
            if self._task is not None:
                await self._task
        finally:
            self._executor.shutdown(wait=True)

    async def submit(
        self,
        images: NDArray[np.float32],
        mode: Mode,
        deadline: float,
        *,
        withdraw_on: asyncio.Future[Any] | None = None,
    ) -> tuple[T, MIResult]:
        """Queue ``images`` (B,C,H,W) and wait for their result, at most until ``deadline`` (``time.monotonic``).

        Returns:
            What ``pin()`` gave at admission (every piece ran with it) and the result.

        Args:
            withdraw_on: when this future completes first (e.g. a task that returns when the client disconnects),
                the images leave the queue (or their result is dropped) and :class:`WithdrawnError` is raised.

        Raises:
            OverloadedError: the queue cannot take ``B`` more images (answered at once).
            DeadlineExceededError: no result before the deadline (at once when it has passed already).
            WithdrawnError: ``withdraw_on`` completed first.
            NotReadyError: the batcher is shutting down.
        """
        if self._closed:
            raise NotReadyError("the server is shutting down")
        pinned = self._pin()
        n = int(images.shape[0])
        if self._queued_images + n > self.max_queue_images:
            raise OverloadedError(
                f"queue full: {self._queued_images} images waiting, {n} more would exceed the limit of "
                f"{self.max_queue_images}",
                retry_after_s=1,
            )
        timeout = deadline - time.monotonic()
        if timeout <= 0.0:
            raise _deadline_error(timeout)
        loop = asyncio.get_running_loop()
        pieces = [
            _Piece(images[i : i + self.max_batch_images], mode, pinned, loop.create_future())
            for i in range(0, n, self.max_batch_images)
        ]
        for p in pieces:
            p.request = pieces
        self._queue.extend(pieces)
        self._queued_images += n
        self._observer.queue_changed(self._queued_images)
        try:
            self._pump()
        except BaseException:
            self._abandon(pieces)
            raise
        timer = loop.call_later(timeout, self._fail, pieces, _deadline_error(timeout))

        def withdraw(_: object) -> None:
            self._fail(pieces, WithdrawnError())

        if withdraw_on is not None:
            withdraw_on.add_done_callback(withdraw)
        try:
            if len(pieces) == 1:
                results = [await pieces[0].future]
            else:
                results = await asyncio.gather(*(p.future for p in pieces))
        except asyncio.CancelledError:
            self._abandon(pieces)  # the caller was cancelled: its images leave the queue, nobody else is hurt
            raise
        finally:
            timer.cancel()
            if withdraw_on is not None:
                withdraw_on.remove_done_callback(withdraw)
        return pinned, concat_results(list(results))

    # --- internals --------------------------------------------------------------------------------------------
    def _abandon(self, pieces: list[_Piece]) -> None:
        """Cancel pieces not yet answered and take those not yet sealed out of the queue."""
        removed = 0
        for p in pieces:
            if not p.future.done():
                p.future.cancel()
            if p in self._queue:
                self._queue.remove(p)
                removed += p.n
        if removed:
            self._queued_images -= removed
            self._observer.queue_changed(self._queued_images)

    def _fail_requests(self, pieces: list[_Piece], exc: BaseException) -> None:
        """Fail ``pieces`` not answered yet, and with each its whole request (siblings still queued leave the
        queue, sealed ones are skipped or their answers dropped)."""
        for p in pieces:
            if not p.future.done():
                self._fail(p.request, exc)

    def _fail(self, pieces: list[_Piece], exc: BaseException) -> None:
        """Fail the pieces not yet answered with ``exc`` (deadline or withdrawal): queued ones leave the queue, a
        sealed one's result is dropped when its batch finishes (the others in that batch are not affected)."""
        for p in pieces:
            if not p.future.done():
                p.future.set_exception(exc)
        self._abandon(pieces)

    def _pump(self) -> None:
        """Seal what the rules let go now (on the loop, after every change), and leave the rest to the dispatcher:
        the delay timer while the engine is busy, and the end of :meth:`close`."""
        while self._queue and (self._inflight == 0 or (self._inflight == 1 and self._ready_to_seal())):
            self._seal()
        if self._queue or self._closed:
            self._changed.set()

    async def _dispatch(self) -> None:
        while True:
            if not self._queue:
                if self._closed and self._inflight == 0:
                    return
                self._changed.clear()
                await self._changed.wait()
                continue
            if self._inflight == 0 or (self._inflight == 1 and self._ready_to_seal()):
                self._seal()  # never raises: a failure fails the pieces concerned
                continue
            self._changed.clear()
            wait_s = None
            if self._inflight == 1:
                wait_s = max(self._queue[0].enqueued + self.max_delay_s - time.perf_counter(), 0.0)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait_s):
                    await self._changed.wait()

    def _ready_to_seal(self) -> bool:
        if self._queued_images >= self.max_batch_images:
            return True
        return time.perf_counter() - self._queue[0].enqueued >= self.max_delay_s

    def _seal(self) -> None:
        """Take pieces of the oldest piece's mode and pin, in order, up to max_batch_images, and hand them to the
        worker."""
        mode, pin = self._queue[0].mode, self._queue[0].pin
        batch: list[_Piece] = []
        total = 0
        keep: deque[_Piece] = deque()
        while self._queue:
            p = self._queue.popleft()
            if p.future.done():  # abandoned (timeout or disconnect) after queueing
                continue
            same = p.mode is mode and p.pin is pin
            if same and total + p.n <= self.max_batch_images:
                batch.append(p)
                total += p.n
            else:
                keep.append(p)
                if same:
                    break
        keep.extend(self._queue)
        self._queue = keep
        self._queued_images = sum(p.n for p in keep)
        if not batch:
            self._observer.queue_changed(self._queued_images)
            return
        loop = asyncio.get_running_loop()
        try:
            self._observer.queue_changed(self._queued_images)
            images = batch[0].images if len(batch) == 1 else np.concatenate([p.images for p in batch])
            job = self._executor.submit(self._run_batch, pin, images, mode, batch)
        except Exception as exc:  # these pieces (and their requests) fail; no slot was taken, the batcher goes on
            LOGGER.exception("could not seal a batch of %d pieces (%d images)", len(batch), total)
            self._fail_requests(batch, exc)
            return
        self._inflight += 1

        def done(_: concurrent.futures.Future[MIResult | None]) -> None:  # on the worker thread
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
                loop.call_soon_threadsafe(self._finish, job, batch)

        job.add_done_callback(done)

    def _run_batch(self, pin: T, images: NDArray[np.float32], mode: Mode, batch: list[_Piece]) -> MIResult | None:
        # read across threads: at worst a batch answered meanwhile runs for nothing, as before this check
        if all(p.future.done() for p in batch):
            return None  # every piece was answered already (deadline, withdrawal, a failed sibling): skip it
        now = time.perf_counter()
        self._observer.batch_started(int(images.shape[0]), [now - p.enqueued for p in batch])
        return self._run(pin, images, mode)

    def _finish(self, job: concurrent.futures.Future[MIResult | None], batch: list[_Piece]) -> None:
        self._inflight -= 1
        self.batches_done += 1
        try:
            self._pump()  # the engine's next batch first, then the answers (even if sealing failed)
        finally:
            self._answer(job, batch)

    def _answer(self, job: concurrent.futures.Future[MIResult | None], batch: list[_Piece]) -> None:
        exc: BaseException | None = (
            NotReadyError("the engine worker stopped before the batch ran") if job.cancelled() else job.exception()
        )
        if exc is None:
            res = job.result()
            if res is None:  # skipped: nobody waits for it
                return
            total = sum(p.n for p in batch)
            if len(res) != total:
                exc = RuntimeError(f"engine returned {len(res)} results for a batch of {total} images")
        if exc is not None:
            LOGGER.error("batch of %d pieces failed: %s", len(batch), exc, exc_info=exc)
            self._fail_requests(batch, exc)
            return
        assert res is not None  # no exception, so the job returned a result (a skipped job returned above)
        start = 0
        for p in batch:
            stop = start + p.n
            if not p.future.done():  # a client that left does not poison the others
                p.future.set_result(slice_result(res, start, stop))
            start = stop


def _deadline_error(left_s: float) -> DeadlineExceededError:
    return DeadlineExceededError(
        f"no result within the request timeout ({left_s:.3g} s left at arrival); the server is saturated"
    )

"""The shared path of /predict and OIP infer: batcher -> engine -> flags -> metrics and access-log facts."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import ParamSpec, TypeVar

import numpy as np
from fastapi import Request
from numpy.typing import NDArray
from starlette.types import Receive

from service.api.errors import ClientGoneError
from service.api.middleware import LOG_KEY, START_KEY
from service.api.query_watch import QueryScreen
from service.api.runtime import LoadedModel, ModelHolder
from service.batching import WithdrawnError
from service.config import Settings
from service.errors import DeadlineExceededError, MixinferError
from service.metrics import Metrics
from service.mi.detection import is_flagged
from service.mi.engine import MIResult
from service.mi.params import Mode

LOGGER = logging.getLogger(__name__)

#: parse bodies larger than this (JSON, OIP) and decode images whose encoded bytes exceed it on a worker thread
INLINE_BODY_BYTES = 64 * 1024
_P = ParamSpec("_P")
_T = TypeVar("_T")


def request_deadline(request: Request, settings: Settings) -> float:
    """``time.monotonic()`` by which the request must be answered: arrival + ``request_timeout_s``."""
    return float(request.scope.get(START_KEY, 0.0)) + settings.request_timeout_s


async def off_loop(deadline: float, fn: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs) -> _T:
    """``fn(*args, **kwargs)`` on a worker thread, so the event loop keeps serving others meanwhile.

    Raises:
        DeadlineExceededError: ``deadline`` passed first (``fn`` should check it too, to stop early).
    """
    try:
        return await asyncio.wait_for(asyncio.to_thread(fn, *args, **kwargs), max(0.0, deadline - time.monotonic()))
    except TimeoutError:
        raise DeadlineExceededError(
            "the request timeout (MIXINFER_REQUEST_TIMEOUT_S) passed while its body was decoded"
        ) from None


def refuse_banned_caller(request: Request, caller: str) -> None:
    """Before the body is read: a caller the query watch has banned is refused at once, so a ban costs no reading,
    decoding or validation (the 403 is the same as the one :func:`run_inference` gives).

    Raises:
        ClientBannedError: policy ``ban`` and ``caller`` is banned now.
    """
    screen: QueryScreen | None = request.app.state.query_screen
    if screen is not None:
        screen.refuse_banned(caller)


@dataclass(frozen=True)
class Answer:
    """Engine result of one request plus the model that computed it and the per-image adversarial flags."""

    model: LoadedModel
    result: MIResult
    #: per image: the flag (modes combined and pl: gap >= threshold), None where no gap exists (ol, off)
    adversarial: list[bool | None]


async def _until_disconnect(receive: Receive) -> None:
    """Returns when the client has gone (the body was read already, so only a disconnect can arrive)."""
    while (await receive())["type"] != "http.disconnect":
        continue


async def _submit_while_connected(
    request: Request, holder: ModelHolder, images: NDArray[np.float32], mode: Mode, deadline: float
) -> tuple[LoadedModel, MIResult]:
    """Wait for the batcher, but withdraw the images if the client disconnects first (no work for nobody)."""
    watch = asyncio.ensure_future(_until_disconnect(request.receive))
    try:
        return await holder.batcher.submit(images, mode, deadline, withdraw_on=watch)
    except WithdrawnError:
        raise ClientGoneError("the client closed the connection before the answer was ready") from None
    finally:
        watch.cancel()


def _ns(seconds: float) -> int:
    return max(0, int(seconds * 1e9))


async def run_inference(
    request: Request,
    *,
    holder: ModelHolder,
    metrics: Metrics,
    settings: Settings,
    images: NDArray[np.float32],
    mode: Mode,
    caller: str,
) -> Answer:
    """Screen the images (query watch), queue them, wait for the engine, count the predictions; records
    branch/gap for the access log."""
    screen: QueryScreen | None = request.app.state.query_screen
    verdict = None if screen is None else await screen.screen(caller, images)
    deadline = request_deadline(request, settings)
    arrived = request.scope.get(START_KEY, time.monotonic())
    queued = time.monotonic()
    try:
        model, res = await _submit_while_connected(request, holder, images, mode, deadline)
    except Exception as exc:
        current = holder.current
        if current is not None:
            current.stats.failed(_ns(time.monotonic() - arrived))
        # overloaded, timed out, not ready, the client gone: nothing was answered
        if isinstance(exc, MixinferError) and screen is not None and verdict is not None:
            screen.unanswered(caller, verdict)
        raise
    model.stats.answered(len(res), _ns(queued - arrived), _ns(time.monotonic() - queued))
    if mode is Mode.COMBINED:
        adversarial: list[bool | None] = res.flagged.tolist()
    elif mode is Mode.PL:
        adversarial = is_flagged(res.gap, model.threshold).tolist()
    else:
        adversarial = [None] * len(res)
    branches = [b.value for b in res.branch]
    metrics.observe_predictions(res.label, branches, adversarial, res.gap, model=model.name, version=model.version)
    model.recent_gaps.extend(g for g in res.gap.tolist() if not math.isnan(g))
    facts = request.scope.get(LOG_KEY)
    if facts is not None:
        gaps = [None if math.isnan(g) else round(g, 5) for g in res.gap.tolist()]
        facts.update(images=len(res), model=model.name, version=model.version, branch=branches, gap=gaps)
    return Answer(model, res, adversarial)

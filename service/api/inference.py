"""The shared path of /predict and OIP infer: batcher -> engine -> flags -> metrics and access-log facts."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar

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
from service.errors import DeadlineExceededError, MixinferError, ModelNotFoundError
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
    deadline = request_deadline(request, settings)
    arrived = request.scope.get(START_KEY, time.monotonic())
    watch = asyncio.ensure_future(_until_disconnect(request.receive))
    try:
        answer = await answer_images(
            holder,
            images,
            mode,
            metrics=metrics,
            screen=request.app.state.query_screen,
            caller=caller,
            arrived=arrived,
            deadline=deadline,
            withdraw_on=watch,
        )
    finally:
        watch.cancel()
    facts = request.scope.get(LOG_KEY)
    if facts is not None:
        facts.update(log_facts(answer))
    return answer


async def answer_images(
    holder: ModelHolder,
    images: NDArray[np.float32],
    mode: Mode,
    *,
    metrics: Metrics,
    screen: QueryScreen | None,
    caller: str,
    arrived: float,
    deadline: float,
    withdraw_on: asyncio.Future[Any] | None = None,
) -> Answer:
    """What REST and gRPC share: query screen -> batcher -> engine -> flags -> model statistics and metrics.

    Args:
        caller: the client identity (query watch).
        arrived: ``time.monotonic()`` at the request's arrival; ``deadline``: by when the answer must be ready.
        withdraw_on: completes when nobody waits any more (the images are withdrawn: 499).
    """
    verdict = None if screen is None else await screen.screen(caller, images)
    queued = time.monotonic()
    try:
        try:
            model, res = await holder.batcher.submit(images, mode, deadline, withdraw_on=withdraw_on)
        except WithdrawnError:
            raise ClientGoneError("the client closed the connection before the answer was ready") from None
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
    return Answer(model, res, adversarial)


def log_facts(answer: Answer) -> dict[str, Any]:
    """What the access log records about an answered inference request (never pool indices)."""
    res = answer.result
    gaps = [None if math.isnan(g) else round(g, 5) for g in res.gap.tolist()]
    branches = [b.value for b in res.branch]
    model = answer.model
    return {"images": len(res), "model": model.name, "version": model.version, "branch": branches, "gap": gaps}


def served_model(holder: ModelHolder, name: str, version: str | None = None, *, disclose: bool = True) -> LoadedModel:
    """The served model if ``name`` (and ``version``, when given) name it; the 404 names the served one only if
    ``disclose`` (not on the open readiness routes, which anyone may probe).

    Raises:
        NotReadyError: no model is loaded yet.
        ModelNotFoundError: another name or version.
    """
    model = holder.model
    if name != model.name:
        hint = f"; this server serves {model.name!r}" if disclose else ""
        raise ModelNotFoundError(f"unknown model {name!r}{hint}")
    if version is not None and version != model.version:
        hint = f"; the served version is {model.version}" if disclose else ""
        raise ModelNotFoundError(f"model {name!r} version {version!r} is not served{hint}")
    return model

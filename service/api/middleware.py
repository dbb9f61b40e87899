"""Pure ASGI middlewares: request id + metrics + access log, and the body limit enforced while reading."""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.errors import REQUEST_ID_KEY, internal_error_response, mixinfer_error_response
from service.errors import PayloadTooLargeError
from service.metrics import UNMATCHED_ROUTE, Metrics

LOGGER = logging.getLogger(__name__)
ACCESS = logging.getLogger("mixinfer.access")

REQUEST_ID_HEADER = b"x-request-id"
SAFE_REQUEST_ID = re.compile(rb"^[A-Za-z0-9._:-]{1,128}$")
#: scope keys shared with the routes
START_KEY = "mixinfer.start"  # time.monotonic() at arrival
LOG_KEY = "mixinfer.log"  # dict the route fills with per-request facts for the access log (branch, gap, images)


class ObserveMiddleware:
    """Echo or create ``X-Request-ID``, count and time every request by route template, write the access log."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        scope[START_KEY] = time.monotonic()
        rid = b""
        for key, value in scope["headers"]:
            if key == REQUEST_ID_HEADER:
                rid = value
                break
        if not SAFE_REQUEST_ID.match(rid):
            rid = uuid.uuid4().hex.encode()
        scope[REQUEST_ID_KEY] = rid.decode()
        facts: dict[str, Any] = {}
        scope[LOG_KEY] = facts
        status = 500

        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                started = True
                status = int(message["status"])
                message["headers"] = [*message.get("headers", []), (REQUEST_ID_HEADER, rid)]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            # answered here, inside the request id: one log line with the traceback and the id, and a 500 that
            # names the id (Starlette's outermost handler would answer without it and log the traceback twice)
            LOGGER.exception(
                "unhandled error on %s %s (request id %s)", scope["method"], scope["path"], scope[REQUEST_ID_KEY]
            )
            if started:
                raise
            await internal_error_response(scope["path"], scope[REQUEST_ID_KEY])(scope, receive, send_with_id)
        finally:
            elapsed = time.perf_counter() - t0
            route = scope.get("route") or _refused_route(scope)
            template = getattr(route, "path", None) or UNMATCHED_ROUTE
            self.metrics.observe_request(template, status, elapsed, facts.get("model"), facts.get("version"))
            if ACCESS.isEnabledFor(logging.INFO):
                # makeRecord + handle is Logger.info without its caller lookup (a stack walk per request)
                record = ACCESS.makeRecord(
                    ACCESS.name,
                    logging.INFO,
                    __file__,
                    0,
                    "%s %s %d %.2fms",
                    (scope["method"], template, status, elapsed * 1000.0),
                    None,
                    extra={
                        "access": {
                            "request_id": scope[REQUEST_ID_KEY],
                            "method": scope["method"],
                            "route": template,
                            "code": status,
                            "latency_ms": round(elapsed * 1000.0, 3),
                            **facts,
                        }
                    },
                )
                ACCESS.handle(record)


def _refused_route(scope: Scope) -> Any:
    """The route a request was refused in front of (e.g. a 413 by Content-Length), so it is counted under it."""
    from fastapi.routing import iter_route_contexts
    from starlette.routing import Match

    for context in iter_route_contexts(getattr(scope.get("app"), "routes", ())):
        if context.route.matches(scope)[0] is Match.FULL:
            return context.route
    return None


#: a refused body is read and discarded up to this many bytes past the limit, for at most this long (then cut off)
DRAIN_MAX_BYTES = 64 * 1024 * 1024
DRAIN_MAX_S = 5.0


class BodyLimitMiddleware:
    """Refuse bodies over ``max_bytes`` with 413: by ``Content-Length`` before reading, else while reading.

    The count is kept on the ASGI ``receive`` stream, so nothing past the limit is ever buffered; if the app has
    not started its response when the limit trips, whatever it tries to send is replaced by the 413.

    Before the 413 the rest of the body is read and discarded, at most :data:`DRAIN_MAX_BYTES` and
    :data:`DRAIN_MAX_S` (what nginx's lingering close does after its response): clients that send their whole body
    before reading (Python's ``urllib``, ``requests``) would otherwise get a connection reset instead of the 413.
    Past either bound, or with ``Expect: 100-continue`` (the body was never sent), the 413 goes at once. Any other
    answer the app gives before reading the body (a 401, 404, 415, 429, a banned client's 403) drains it the same
    way, within the body limit.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = -1
        expects_continue = chunked = False
        for key, value in scope["headers"]:
            if key == b"content-length":
                declared = int(value) if value.isdigit() else -1
            elif key == b"expect":
                expects_continue = value.lower() == b"100-continue"
            elif key == b"transfer-encoding":
                chunked = b"chunked" in value.lower()
        if declared > self.max_bytes:
            if not expects_continue and declared - self.max_bytes <= DRAIN_MAX_BYTES:
                await _drain(receive)
            await self._refuse(scope, send, f"{declared} bytes declared")
            return
        received = 0
        exceeded = False
        started = False
        replaced = False
        # with Expect: 100-continue the body comes only once the app reads it: nothing to drain otherwise
        body_pending = (declared > 0 or chunked) and not expects_continue

        async def limited_receive() -> Message:
            nonlocal received, exceeded, body_pending
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                body_pending = body_pending and message.get("more_body", False)
                if received > self.max_bytes:
                    exceeded = True
                    raise PayloadTooLargeError(self._message(f"more than {self.max_bytes} bytes sent"))
            else:
                body_pending = False
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started, replaced, body_pending
            if replaced:
                return
            if exceeded and not started:
                started = replaced = True
                await _drain(receive)
                await self._refuse(scope, send, f"more than {self.max_bytes} bytes sent")
                return
            if message["type"] == "http.response.start":
                started = True
                if body_pending:  # answered before the body was read (401, 403, 404, 415, 429): read it first
                    body_pending = False
                    await _drain(limited_drain)
            await send(message)

        async def limited_drain() -> Message:
            """``receive`` for the drain of a body the app never read: within the body limit."""
            message = await receive()
            nonlocal received
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                return {"type": "http.disconnect"}  # stop draining; the answer goes and the connection closes
            return message

        try:
            await self.app(scope, limited_receive, guarded_send)
        except PayloadTooLargeError:
            if not exceeded or started:
                raise
            await _drain(receive)
            await self._refuse(scope, send, f"more than {self.max_bytes} bytes sent")

    def _message(self, got: str) -> str:
        return f"request body too large: the limit is {self.max_bytes} bytes, got {got}"

    async def _refuse(self, scope: Scope, send: Send, got: str) -> None:
        response = mixinfer_error_response(scope["path"], PayloadTooLargeError(self._message(got)))
        response.headers["Connection"] = "close"
        await response(scope, _no_receive, send)


async def _drain(receive: Receive) -> None:
    """Read and discard the rest of a refused body: until its end, :data:`DRAIN_MAX_BYTES` or :data:`DRAIN_MAX_S`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DRAIN_MAX_S
    drained = 0
    while drained <= DRAIN_MAX_BYTES:
        try:
            message = await asyncio.wait_for(receive(), deadline - loop.time())
        except TimeoutError:
            return
        if message["type"] != "http.request" or not message.get("more_body", False):
            return
        drained += len(message.get("body", b""))


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}

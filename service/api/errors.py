"""Map the exception tree (and framework errors) to JSON once; never a stack trace in a body."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import Response

from service.api.responses import error_response
from service.errors import MixinferError, NotReadyError, OverloadedError, UnauthorizedError

LOGGER = logging.getLogger(__name__)

#: scope key of the request id (set by service.api.middleware.ObserveMiddleware)
REQUEST_ID_KEY = "mixinfer.request_id"


class ClientGoneError(MixinferError):
    """The client disconnected while its images waited; nobody reads this answer (logged and counted as 499)."""

    status_code = 499
    code = "client_closed_request"


#: status recorded when the client disconnects before its request is read (never sent: nobody is listening)
CLIENT_CLOSED_REQUEST = 499
_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 400: "bad_request", 413: "payload_too_large"}


def mixinfer_error_response(path: str, exc: MixinferError, request_id: str | None = None) -> Response:
    """The response for one of our exceptions (also used by the ASGI middlewares); a 5xx names the request id in
    its log line and its message, so that a client's report finds the log line."""
    headers: dict[str, str] = {}
    if exc.retry_after_s is not None:
        headers["Retry-After"] = str(exc.retry_after_s)
    if isinstance(exc, UnauthorizedError):
        headers["WWW-Authenticate"] = "Bearer"
    message = client_message(exc, request_id)
    if is_server_fault(exc):
        LOGGER.error("%s: %s", exc.code, message)
    return error_response(path, exc.status_code, exc.code, message, headers or None)


def client_message(exc: MixinferError, request_id: str | None) -> str:
    """The message a client gets (REST and gRPC): a 5xx names the request id, so that a report finds the log line."""
    if exc.status_code >= 500 and request_id is not None:
        return f"{exc.message} (request id {request_id})"
    return exc.message


def is_server_fault(exc: MixinferError) -> bool:
    """A 5xx worth an ERROR log line: not the expected load shedding (not ready, queue full), which would flood the
    log under overload."""
    return exc.status_code >= 500 and not isinstance(exc, (NotReadyError, OverloadedError))


def internal_error_response(path: str, request_id: str) -> Response:
    """The 500 of an unhandled exception: no detail, the request id to find the log line."""
    message = f"internal server error (request id {request_id}); see the server log"
    return error_response(path, 500, "internal_error", message)


async def _on_mixinfer_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, MixinferError)
    return mixinfer_error_response(request.url.path, exc, request.scope.get(REQUEST_ID_KEY))


async def _on_validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err.get("loc", ()))
        parts.append(f"{loc}: {err.get('msg', 'invalid')}")
    return error_response(request.url.path, 422, "validation_error", "; ".join(parts) or "invalid request")


async def _on_http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    code = _HTTP_CODES.get(exc.status_code, "http_error")
    return error_response(request.url.path, exc.status_code, code, str(exc.detail), dict(exc.headers or {}) or None)


async def _on_client_disconnect(request: Request, exc: Exception) -> Response:
    """The client went away while sending its body: nobody can read an answer. 499 (nginx's "client closed
    request") keeps it out of the 5xx counts, the alerts and the error log."""
    LOGGER.info("client disconnected during %s %s", request.method, request.url.path)
    return Response(status_code=CLIENT_CLOSED_REQUEST)


async def _on_unexpected(request: Request, exc: Exception) -> Response:
    """Last resort (ObserveMiddleware answers unhandled errors of the app itself, with the request id)."""
    request_id = request.scope.get(REQUEST_ID_KEY, "none")
    LOGGER.exception("unhandled error on %s %s (request id %s)", request.method, request.url.path, request_id)
    return internal_error_response(request.url.path, request_id)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(MixinferError, _on_mixinfer_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    app.add_exception_handler(ClientDisconnect, _on_client_disconnect)
    app.add_exception_handler(Exception, _on_unexpected)

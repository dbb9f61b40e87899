"""Map the exception tree (and framework errors) to JSON once; never a stack trace in a body."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import Response

from service.api.responses import error_response
from service.errors import MixinferError, OverloadedError, UnauthorizedError

LOGGER = logging.getLogger(__name__)


class ClientGoneError(MixinferError):
    """The client disconnected while its images waited; nobody reads this answer (logged and counted as 499)."""

    status_code = 499
    code = "client_closed_request"


#: status recorded when the client disconnects before its request is read (never sent: nobody is listening)
CLIENT_CLOSED_REQUEST = 499
_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 400: "bad_request", 413: "payload_too_large"}


def mixinfer_error_response(path: str, exc: MixinferError) -> Response:
    """The response for one of our exceptions (also used by the ASGI middlewares)."""
    headers: dict[str, str] = {}
    if isinstance(exc, OverloadedError):
        headers["Retry-After"] = str(exc.retry_after_s)
    if isinstance(exc, UnauthorizedError):
        headers["WWW-Authenticate"] = "Bearer"
    if exc.status_code >= 500:
        LOGGER.error("%s: %s", exc.code, exc.message)
    return error_response(path, exc.status_code, exc.code, exc.message, headers or None)


async def _on_mixinfer_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, MixinferError)
    return mixinfer_error_response(request.url.path, exc)


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
    LOGGER.exception("unhandled error on %s %s", request.method, request.url.path)
    return error_response(request.url.path, 500, "internal_error", "internal server error; see the server log")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(MixinferError, _on_mixinfer_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    app.add_exception_handler(ClientDisconnect, _on_client_disconnect)
    app.add_exception_handler(Exception, _on_unexpected)

"""One exception tree for the whole service; each error knows its HTTP status and is mapped to JSON once."""

from __future__ import annotations


class MixinferError(Exception):
    """Base of every error this package raises on purpose.

    Messages say what was wrong, what was expected and what was got, e.g.
    ``"pool class 3 has 0 images, every class needs >= 1"``.
    """

    status_code: int = 500
    code: str = "internal_error"
    #: seconds a client should wait before retrying (sent as ``Retry-After``); None: no header
    retry_after_s: int | None = None

    def __init__(self, message: str, retry_after_s: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if retry_after_s is not None:
            self.retry_after_s = retry_after_s


# --- artifact / start-up -------------------------------------------------------------------------------------
class BundleError(MixinferError):
    """A model bundle is missing, corrupt, inconsistent or unsafe; the server refuses to load it."""

    status_code = 500
    code = "bundle_invalid"


class BundleNotFoundError(BundleError):
    """The requested model name or version is not in the store."""

    status_code = 404
    code = "model_not_found"


class BackendError(MixinferError):
    """The inference backend cannot be created as configured (e.g. CUDA asked for but unavailable)."""

    status_code = 500
    code = "backend_unavailable"


class ConfigError(MixinferError):
    """A configuration value is unsafe or inconsistent; refused at start-up."""

    status_code = 500
    code = "config_invalid"


# --- client mistakes (4xx) -----------------------------------------------------------------------------------
class ClientError(MixinferError):
    """The request is wrong; the message tells the client what to fix."""

    status_code = 400
    code = "bad_request"


class InvalidInputError(ClientError):
    """Undecodable image, wrong channels or shape, NaN/inf or out-of-range values."""

    status_code = 400
    code = "invalid_input"


class PayloadTooLargeError(ClientError):
    """Body over the byte limit, too many images or too many pixels."""

    status_code = 413
    code = "payload_too_large"


class UnsupportedMediaTypeError(ClientError):
    """Content type the endpoint does not accept."""

    status_code = 415
    code = "unsupported_media_type"


class UnauthorizedError(ClientError):
    """Missing or wrong API key."""

    status_code = 401
    code = "unauthorized"


class ForbiddenError(ClientError):
    """Authenticated but not allowed (mode override disabled, admin routes disabled or wrong key)."""

    status_code = 403
    code = "forbidden"


class QueryRejectedError(ForbiddenError):
    """The query-attack watch refused a near-copy of this client's earlier queries (policy ``reject``)."""

    code = "query_rejected"


class ClientBannedError(ForbiddenError):
    """The query-attack watch banned this client for a while (policy ``ban``)."""

    code = "client_banned"


class NotFoundError(ClientError):
    """The URL names nothing this server serves there."""

    status_code = 404
    code = "not_found"


class ModelNotFoundError(ClientError):
    """The URL names a model or version this server does not have."""

    status_code = 404
    code = "model_not_found"


class RateLimitedError(ClientError):
    """The caller exceeded its per-key (or per-client) request rate; retry after ``Retry-After`` seconds."""

    status_code = 429
    code = "rate_limited"
    retry_after_s = 1


# --- server state (5xx, not the client's fault) --------------------------------------------------------------
class NotReadyError(MixinferError):
    """No model is loaded and warmed up yet, or the server is shutting down."""

    status_code = 503
    code = "not_ready"
    retry_after_s = 1


class OverloadedError(MixinferError):
    """The queue is full (the server, not the caller, is short of capacity); retry after a short delay."""

    status_code = 503
    code = "overloaded"
    retry_after_s = 1


class DeadlineExceededError(MixinferError):
    """The request waited longer than the configured request timeout."""

    status_code = 504
    code = "deadline_exceeded"

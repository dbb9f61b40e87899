"""The OIP v2 gRPC server (KServe ``inference.GRPCInferenceService``) on ``MIXINFER_GRPC_PORT``.

It runs on the app's own event loop (``grpc.aio``) beside uvicorn and shares everything with REST: the model
holder and its micro-batcher, the limits, the API keys (metadata ``authorization: Bearer <key>``) and the per-key
rate limit, the metrics (``mixinfer_requests_total`` with route ``/inference.GRPCInferenceService/<Method>`` and the
HTTP-equivalent status code, so that dashboards and alerts read both transports alike), request IDs
(``x-request-id`` metadata, echoed or created, in the initial metadata) and the access log. The request message
limit is MIXINFER_MAX_BODY_BYTES, the REST body limit (at most 2 GiB - 1, gRPC's own ceiling); gRPC refuses a larger
message with RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

import grpc
from google.protobuf import json_format
from google.protobuf.message import DecodeError
from grpc import aio

from service import __version__
from service.api.deps import RateLimiter, bearer_token, caller_identity, check_admin_key, resolve_mode
from service.api.detail import OIP_OUTPUTS, answer_view, check_requested_outputs, model_metadata_doc, oip_tensors
from service.api.errors import client_message, is_server_fault
from service.api.grpc_codec import decode_infer, encode_infer, error_status
from service.api.identity import TrustedProxies, resolve_client
from service.api.inference import INLINE_BODY_BYTES, answer_images, log_facts, off_loop, served_model
from service.api.middleware import ACCESS, SAFE_REQUEST_ID
from service.api.oip import GRPC_SERVICE, SERVER_EXTENSIONS
from service.api.query_watch import QueryScreen
from service.api.routes.admin import repository_index
from service.api.runtime import ModelHolder
from service.config import Settings
from service.errors import InvalidInputError, MixinferError, ModelNotFoundError
from service.metrics import Metrics

LOGGER = logging.getLogger(__name__)

#: HTTP-equivalent code recorded for a call the client cancelled (nginx's "client closed request", as REST)
_CANCELLED = 499
#: gRPC's message size options are C ints: a larger MIXINFER_MAX_BODY_BYTES (the settings allow 2 GiB) is capped here
GRPC_MAX_MESSAGE_BYTES = (1 << 31) - 1
_Handler = Callable[[Any, "_Call"], Awaitable[Any]]
#: method of the service -> the InferenceHandlers method that answers it
HANDLERS = {
    "ServerLive": "live",
    "ServerReady": "ready",
    "ServerMetadata": "server_metadata",
    "ModelReady": "model_ready",
    "ModelMetadata": "model_metadata",
    "ModelInfer": "infer",
    "ModelStatistics": "statistics",
    "RepositoryIndex": "repository_index",
}


class _Call:
    """Per-call facts: request id, arrival time, what the access log records."""

    def __init__(self, context: aio.ServicerContext) -> None:
        self.started = time.monotonic()
        metadata = dict(context.invocation_metadata() or ())
        rid = metadata.get("x-request-id", "")
        self.request_id = rid if isinstance(rid, str) and SAFE_REQUEST_ID.match(rid.encode()) else uuid.uuid4().hex
        self.authorization = metadata.get("authorization")
        self.forwarded_for = metadata.get("x-forwarded-for")
        self.peer = context.peer() or "unknown"
        self.facts: dict[str, Any] = {}


def peer_host(peer: str) -> str | None:
    """The host of a gRPC peer string (``ipv4:10.0.0.7:51234``, ``ipv6:%5B::1%5D:51234``: gRPC URI-escapes the
    brackets), None for other kinds."""
    kind, _, rest = peer.partition(":")
    rest = unquote(rest)
    if kind not in ("ipv4", "ipv6") or ":" not in rest:
        return None
    return rest.rsplit(":", 1)[0].strip("[]")


class InferenceHandlers:
    """The implemented methods of ``inference.GRPCInferenceService`` (:data:`HANDLERS`), served by
    :func:`method_handlers`."""

    def __init__(self, state: Any) -> None:
        self.settings: Settings = state.settings
        self.holder: ModelHolder = state.holder
        self.metrics: Metrics = state.metrics
        self.limiter: RateLimiter | None = state.rate_limiter
        self.screen: QueryScreen | None = state.query_screen
        self.trusted: TrustedProxies = state.trusted_proxies
        self.admin_limiter: RateLimiter = state.admin_limiter
        from tritonclient.grpc import service_pb2

        self.pb = service_pb2

    # --- the wrapper every method goes through ----------------------------------------------------------------
    async def serve(self, method: str, request: Any, context: aio.ServicerContext, handler: _Handler) -> Any:
        call = _Call(context)
        t0 = time.perf_counter()
        status = 200
        try:
            await context.send_initial_metadata((("x-request-id", call.request_id),))
            if isinstance(request, Malformed):
                raise InvalidInputError(request.message)
            return await handler(request, call)
        except MixinferError as exc:
            status = exc.status_code
            code, trailers = error_status(exc)
            message = client_message(exc, call.request_id)
            if is_server_fault(exc):
                LOGGER.error("%s: %s", exc.code, message)
            await context.abort(code, message, (("x-request-id", call.request_id), *trailers))
        except asyncio.CancelledError:
            status = _CANCELLED
            raise
        except aio.AbortError:
            raise
        except Exception:
            status = 500
            LOGGER.exception("unhandled error in gRPC %s (request id %s)", method, call.request_id)
            message = f"internal server error (request id {call.request_id}); see the server log"
            await context.abort(grpc.StatusCode.INTERNAL, message, (("x-request-id", call.request_id),))
        finally:
            self._observe(method, status, time.perf_counter() - t0, call)
        raise AssertionError("unreachable: context.abort raises")  # pragma: no cover

    def _observe(self, method: str, status: int, elapsed: float, call: _Call) -> None:
        route = f"/{GRPC_SERVICE}/{method}"
        self.metrics.observe_request(route, status, elapsed, call.facts.get("model"), call.facts.get("version"))
        if ACCESS.isEnabledFor(logging.INFO):
            access = {
                "request_id": call.request_id,
                "method": "GRPC",
                "route": route,
                "code": status,
                "latency_ms": round(elapsed * 1000.0, 3),
                **call.facts,
            }
            ACCESS.info("GRPC %s %d %.2fms", route, status, elapsed * 1000.0, extra={"access": access})

    def _address(self, call: _Call) -> str:
        return resolve_client(peer_host(call.peer), call.forwarded_for, self.trusted)

    def _authorise(self, call: _Call) -> str:
        """The caller identity (API key index, else the client address under MIXINFER_TRUSTED_PROXIES, as on
        REST), after the key check and the rate limit."""
        return caller_identity(bearer_token(call.authorization), self._address(call), self.settings, self.limiter)

    # --- health and metadata (open, as their REST twins) ----------------------------------------------------
    async def live(self, request: Any, call: _Call) -> Any:
        return self.pb.ServerLiveResponse(live=True)

    async def ready(self, request: Any, call: _Call) -> Any:
        return self.pb.ServerReadyResponse(ready=self.holder.ready)

    async def server_metadata(self, request: Any, call: _Call) -> Any:
        return self.pb.ServerMetadataResponse(name="mixinfer", version=__version__, extensions=list(SERVER_EXTENSIONS))

    async def model_ready(self, request: Any, call: _Call) -> Any:
        if not self.holder.ready:
            return self.pb.ModelReadyResponse(ready=False)
        served_model(self.holder, request.name, request.version or None, disclose=False)
        return self.pb.ModelReadyResponse(ready=True)

    # --- model routes (API key and rate limit, as REST's /v2/models) -----------------------------------------
    async def model_metadata(self, request: Any, call: _Call) -> Any:
        self._authorise(call)
        doc = model_metadata_doc(served_model(self.holder, request.name, request.version or None), self.settings)
        tensor = self.pb.ModelMetadataResponse.TensorMetadata
        return self.pb.ModelMetadataResponse(
            name=doc["name"],
            versions=doc["versions"],
            platform=doc["platform"],
            inputs=[tensor(**t) for t in doc["inputs"]],
            outputs=[tensor(**t) for t in doc["outputs"]],
        )

    async def infer(self, request: Any, call: _Call) -> Any:
        caller = self._authorise(call)
        settings = self.settings
        model = served_model(self.holder, request.model_name, request.model_version or None)
        if self.screen is not None:  # a banned caller is refused before its message is decoded, as on REST
            self.screen.refuse_banned(caller)
        t0 = time.perf_counter()
        detail = settings.response_detail
        args = (request, model.manifest.input.name, model.spec, settings.max_images_per_request)
        deadline = call.started + settings.request_timeout_s
        if request.ByteSize() > INLINE_BODY_BYTES:  # converted on a worker thread, as REST does with large bodies
            parsed = await off_loop(deadline, decode_infer, *args, default_outputs=OIP_OUTPUTS[detail])
        else:
            parsed = decode_infer(*args, default_outputs=OIP_OUTPUTS[detail])
        check_requested_outputs([(name, True) for name in parsed.outputs], detail)
        mode = resolve_mode(parsed.mode, settings)
        self.metrics.observe_stage("decode", time.perf_counter() - t0)
        answer = await answer_images(
            self.holder,
            parsed.images,
            mode,
            metrics=self.metrics,
            screen=self.screen,
            caller=caller,
            arrived=call.started,
            deadline=deadline,
        )
        call.facts.update(log_facts(answer))
        response = self.pb.ModelInferResponse(
            model_name=answer.model.name, model_version=answer.model.version, id=request.id
        )
        encode_infer(response, oip_tensors(answer_view(answer, detail)), parsed.outputs)
        return response

    async def statistics(self, request: Any, call: _Call) -> Any:
        """Triton's per-model statistics, as ``GET /v2/models[/{name}[/versions/{v}]]/stats`` (API key)."""
        self._authorise(call)
        model = self.holder.current
        if request.name:
            model = self.holder.model
            if request.name != model.name or (request.version and request.version != model.version):
                version = f" version {request.version!r}" if request.version else ""
                raise ModelNotFoundError(f"no statistics for model {request.name!r}{version}")
        stats = [] if model is None else [model.stats.to_triton(model.name, model.version)]
        return json_format.ParseDict({"model_stats": stats}, self.pb.ModelStatisticsResponse())

    async def repository_index(self, request: Any, call: _Call) -> Any:
        """The repository index, as ``POST /v2/repository/index`` (admin key, throttled per client address)."""
        check_admin_key(bearer_token(call.authorization), self._address(call), self.settings, self.admin_limiter)
        entries = repository_index(self.holder, self.settings, ready_only=request.ready)
        return self.pb.RepositoryIndexResponse(
            models=[self.pb.RepositoryIndexResponse.ModelIndex(**e) for e in entries]
        )


@dataclass(frozen=True)
class Malformed:
    """What the tolerant deserializer returns for bytes that are not the method's message (answered
    INVALID_ARGUMENT, where gRPC's own deserializer failure would answer INTERNAL)."""

    message: str


def method_handlers(handlers: InferenceHandlers) -> grpc.GenericRpcHandler:
    """Every method of ``inference.GRPCInferenceService`` with the generated messages of ``tritonclient``: the
    implemented ones (:data:`HANDLERS`) go through :meth:`InferenceHandlers.serve`, the rest answer UNIMPLEMENTED."""
    from tritonclient.grpc import service_pb2

    methods = service_pb2.DESCRIPTOR.services_by_name[GRPC_SERVICE.rsplit(".", 1)[1]].methods
    table: dict[str, grpc.RpcMethodHandler] = {}
    for method in methods:
        reply = getattr(service_pb2, method.output_type.name).SerializeToString
        parse = _tolerant(getattr(service_pb2, method.input_type.name))
        if method.client_streaming or method.server_streaming:
            table[method.name] = grpc.stream_stream_rpc_method_handler(
                _unimplemented(method.name), request_deserializer=parse, response_serializer=reply
            )
        elif method.name in HANDLERS:
            behaviour = _bound(handlers, method.name, getattr(handlers, HANDLERS[method.name]))
            table[method.name] = grpc.unary_unary_rpc_method_handler(
                behaviour, request_deserializer=parse, response_serializer=reply
            )
        else:
            table[method.name] = grpc.unary_unary_rpc_method_handler(
                _unimplemented(method.name), request_deserializer=parse, response_serializer=reply
            )
    return grpc.method_handlers_generic_handler(GRPC_SERVICE, table)


def _tolerant(message_type: Any) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            return message_type.FromString(data)
        except DecodeError as exc:
            return Malformed(f"the request is not a valid {message_type.DESCRIPTOR.full_name} message: {exc}")

    return parse


def _bound(handlers: InferenceHandlers, name: str, handler: _Handler) -> Callable[..., Awaitable[Any]]:
    async def call(request: Any, context: aio.ServicerContext) -> Any:
        return await handlers.serve(name, request, context, handler)

    return call


def _unimplemented(name: str) -> Callable[..., Awaitable[Any]]:
    async def refuse(request: Any, context: aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{GRPC_SERVICE}/{name} is not implemented by mixinfer")

    return refuse


class GrpcServer:
    """Start and stop the gRPC server on the running event loop; ``state`` is the FastAPI app's state."""

    def __init__(self, state: Any) -> None:
        self.settings: Settings = state.settings
        self.handlers = InferenceHandlers(state)
        self._server: aio.Server | None = None

    @property
    def address(self) -> str:
        host = self.settings.host
        return f"[{host}]:{self.settings.grpc_port}" if ":" in host else f"{host}:{self.settings.grpc_port}"

    async def start(self) -> None:
        """Bind and start; raises RuntimeError when the port cannot be bound (the server refuses to start)."""
        limit = min(self.settings.max_body_bytes, GRPC_MAX_MESSAGE_BYTES)
        server = aio.server(
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", max(limit, 4 * 1024 * 1024)),
                ("grpc.so_reuseport", 0),  # a port in use is an error, not a second listener beside another server
            ]
        )
        server.add_generic_rpc_handlers((method_handlers(self.handlers),))
        try:
            server.add_insecure_port(self.address)
        except RuntimeError as exc:
            LOGGER.error("refusing to start: cannot serve gRPC on %s (MIXINFER_GRPC_PORT): %s", self.address, exc)
            raise
        await server.start()
        self._server = server
        LOGGER.info("serving OIP v2 gRPC on %s", self.address)

    async def stop(self, grace_s: float) -> None:
        """Refuse new calls, let calls in flight finish for up to ``grace_s``, then cancel the rest."""
        if self._server is not None:
            await self._server.stop(grace_s)
            self._server = None

"""The server a user would otherwise write: one worker, per request one clean call and one call over its mixes.

Same bundle, same ONNX Runtime backend and settings, same decode path and the same lazy OL branch as mixinfer
(it calls the same ``MIEngine`` with a batch of ONE image), but no cross-request batching: FastAPI runs the
blocking handler in its thread pool, so concurrent requests make concurrent small ONNX Runtime calls. This is the
baseline for ``http_vs_naive``.

Usage: ``python bench/naive_server.py --bundle runs/bench/store/resnet18-bench/1 --port 8101``
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":  # `python bench/x.py` puts bench/ first on sys.path, where bench/http.py would shadow
    sys.path[0] = str(Path(__file__).resolve().parent.parent)  # the standard library's http: use the repo root

import argparse
import threading
from contextlib import asynccontextmanager
from typing import Any

import numpy as np
import orjson
from fastapi import FastAPI, Request, Response
from starlette.concurrency import run_in_threadpool

from bench.common import run_baseline_server
from service.errors import MixinferError
from service.mi.params import Mode
from service.preprocess import ImageSpec, decode_image

MAX_BODY = 16 * 1024 * 1024


def create_app(
    bundle_dir: Path, intra_op_threads: int | None = None, providers: str = "CPUExecutionProvider"
) -> FastAPI:
    """Load the bundle in the lifespan, then answer one image per request through the engine."""
    state: dict[str, Any] = {}
    local = threading.local()

    @asynccontextmanager
    async def lifespan(_: FastAPI):  # type: ignore[no-untyped-def]
        from service.mi.engine import MIEngine
        from service.store import load_bundle, open_backend

        bundle = load_bundle(bundle_dir)
        backend = open_backend(bundle, providers=providers.split(","), intra_op_threads=intra_op_threads)
        engine = MIEngine(backend, bundle.pool_labels, bundle.manifest.mi)
        engine.warmup((1,))
        c, h, w = bundle.manifest.input.shape
        state.update(engine=engine, manifest=bundle.manifest, spec=ImageSpec(c, h, w))
        yield

    app = FastAPI(title="naive MI server", lifespan=lifespan, openapi_url=None, docs_url=None, redoc_url=None)

    @app.get("/health")
    def health() -> Response:
        return Response(b"{}", media_type="application/json")

    def classify(body: bytes) -> Response:
        """Blocking part (thread pool): decode, one clean call, one PL mix call, OL only if flagged."""
        rng = getattr(local, "rng", None)
        if rng is None:
            rng = local.rng = np.random.default_rng()
        manifest = state["manifest"]
        try:
            x = decode_image(body, state["spec"])
        except MixinferError as exc:
            return Response(orjson.dumps({"error": exc.message}), status_code=exc.status_code)
        res = state["engine"](x[None], Mode.COMBINED, rng=rng)
        names = manifest.class_names
        k = int(res.label[0])
        answer = {
            "model": manifest.name,
            "version": manifest.version,
            "predictions": [
                {
                    "label": names[k],
                    "class_index": k,
                    "probabilities": dict(zip(names, res.probs[0].tolist(), strict=True)),
                    "adversarial": bool(res.flagged[0]),
                    "detection_gap": float(res.gap[0]),
                    "threshold": manifest.mi.threshold,
                    "mode": res.branch[0].value,
                    "mixes": int(res.n_mixes[0]),
                }
            ],
        }
        return Response(orjson.dumps(answer), media_type="application/json")

    @app.post("/predict")
    async def predict(request: Request) -> Response:
        """Read the raw body, then do what a sync ``def`` route does: run the blocking work in the thread pool."""
        body = await request.body()
        if len(body) > MAX_BODY:
            return Response(b'{"error":"too large"}', status_code=413, media_type="application/json")
        return await run_in_threadpool(classify, body)

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--providers", default="CPUExecutionProvider", help="ONNX Runtime providers, in order")
    parser.add_argument("--intra-op-threads", type=int, default=None, help="ONNX Runtime threads (default: ORT's)")
    args = parser.parse_args()
    run_baseline_server(create_app(args.bundle, args.intra_op_threads, args.providers), args.port)


if __name__ == "__main__":
    main()

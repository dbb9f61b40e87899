"""The I/O floor: the service's HTTP stack and decode path with no inference at all.

``POST /predict`` takes a raw ``image/*`` body, decodes it with the service's own ``decode_image`` at the bundle's
input size, and returns a fixed JSON answer shaped like the real one. Whatever mixinfer does beyond this costs
throughput; ``bench/http.py`` reports mixinfer's throughput as a fraction of this server's.

Usage: ``python bench/io_floor.py --bundle model_store/mnist-mixup/2 --port 8100``
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":  # `python bench/x.py` puts bench/ first on sys.path, where bench/http.py would shadow
    sys.path[0] = str(Path(__file__).resolve().parent.parent)  # the standard library's http: use the repo root

import argparse
import json
from typing import Any

import orjson
from fastapi import FastAPI, Request, Response

from bench.common import run_baseline_server
from service.errors import MixinferError
from service.manifest import MANIFEST_FILE
from service.preprocess import ImageSpec, decode_image

MAX_BODY = 16 * 1024 * 1024


def create_app(bundle_dir: Path) -> FastAPI:
    """The floor app for the bundle's input shape and class names (read from its manifest only)."""
    manifest = json.loads((bundle_dir / MANIFEST_FILE).read_text(encoding="utf-8"))
    c, h, w = manifest["input"]["shape"]
    names: list[str] = list(manifest["class_names"])
    spec = ImageSpec(c, h, w)
    answer: dict[str, Any] = {
        "model": manifest["name"],
        "version": manifest["version"],
        "predictions": [
            {
                "label": names[0],
                "class_index": 0,
                "probabilities": {n: round(1.0 / len(names), 6) for n in names},
                "adversarial": False,
                "detection_gap": 0.01,
                "threshold": manifest["mi"]["threshold"],
                "mode": "pl",
                "mixes": manifest["mi"]["n_pl"],
            }
        ],
    }
    app = FastAPI(title="mixinfer I/O floor", openapi_url=None, docs_url=None, redoc_url=None)

    @app.get("/health")
    async def health() -> Response:
        return Response(b"{}", media_type="application/json")

    @app.post("/predict")
    async def predict(request: Request) -> Response:
        body = await request.body()
        if len(body) > MAX_BODY:
            return Response(b'{"error":"too large"}', status_code=413, media_type="application/json")
        try:
            decode_image(body, spec)
        except MixinferError as exc:
            return Response(orjson.dumps({"error": exc.message}), status_code=exc.status_code)
        return Response(orjson.dumps(answer), media_type="application/json")

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, required=True, help="bundle directory (its manifest gives the shape)")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    run_baseline_server(create_app(args.bundle), args.port)


if __name__ == "__main__":
    main()

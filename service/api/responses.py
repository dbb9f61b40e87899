"""Fast JSON responses (orjson, numpy-aware) and the two error body shapes, built in one place."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.responses import JSONResponse

_OPTIONS = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS


class OrjsonResponse(JSONResponse):
    """``application/json`` rendered by orjson (NaN/inf become null, numpy arrays serialise directly)."""

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=_OPTIONS)


def is_oip_path(path: str) -> bool:
    """OIP v2 routes answer errors as ``{"error": msg}``; everything else as ``{"error": {code, message}}``."""
    return path == "/v2" or path.startswith("/v2/")


def error_body(path: str, code: str, message: str) -> dict[str, Any]:
    if is_oip_path(path):
        return {"error": message}
    return {"error": {"code": code, "message": message}}


def error_response(
    path: str, status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> OrjsonResponse:
    return OrjsonResponse(error_body(path, code, message), status_code=status, headers=headers)

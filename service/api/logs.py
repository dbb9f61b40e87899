"""Logging set-up of ``mixinfer serve``: one JSON object per line (or plain text), access log included."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import orjson

LOGGER = logging.getLogger(__name__)


class JsonFormatter(logging.Formatter):
    """``{"ts", "level", "logger", "msg", ...}``; access records add their fields (never pool indices)."""

    _second: int = -1
    _second_text: str = ""

    def format(self, record: logging.LogRecord) -> str:
        second = int(record.created)
        if second != self._second:  # one strftime per second, not per line (handlers format under their lock)
            self._second_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second = second
        out: dict[str, Any] = {
            "ts": f"{self._second_text}.{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        access = getattr(record, "access", None)
        if isinstance(access, dict):
            out.update(access)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(out, option=orjson.OPT_SERIALIZE_NUMPY).decode()


def configure_logging(json_lines: bool, level: int = logging.INFO) -> None:
    """Route the root logger (and uvicorn's) to stderr, as JSON lines or plain text."""
    handler = logging.StreamHandler(sys.stderr)
    if json_lines:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    logging.getLogger("uvicorn.access").disabled = True  # our own access log replaces it

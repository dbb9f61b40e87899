"""How uvicorn runs the app: one configuration for ``mixinfer serve`` and the test servers alike."""

from __future__ import annotations

import logging
from types import FrameType
from typing import Any

import uvicorn

from service.api.identity import uvicorn_proxy_options
from service.config import Settings

LOGGER = logging.getLogger(__name__)


def uvicorn_config(app: Any, settings: Settings, **overrides: Any) -> uvicorn.Config:
    """uvicorn's configuration for ``settings``: address, uvloop + httptools, no access log of its own (the app
    writes one), the drain after SIGTERM, and proxy headers trusted from ``MIXINFER_TRUSTED_PROXIES`` only.

    ``overrides`` replace single options (tests bind port 0 and use the asyncio loop).
    """
    options: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "loop": "uvloop",
        "http": "httptools",
        "log_config": None,
        "access_log": False,
        "timeout_graceful_shutdown": settings.drain_s,
        "server_header": False,
        **uvicorn_proxy_options(settings.trusted_proxies),
    }
    return uvicorn.Config(app, **(options | overrides))


class Server(uvicorn.Server):
    """uvicorn's server, plus: the first SIGTERM/SIGINT starts the app's drain at once (readiness 503, the
    ``mixinfer_ready`` gauge 0), before uvicorn stops accepting and waits for the requests in flight."""

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        holder = getattr(getattr(self.config.app, "state", None), "holder", None)
        if holder is not None:
            holder.start_drain()
        super().handle_exit(sig, frame)

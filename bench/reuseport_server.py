"""One of several ``mixinfer serve`` processes on one port: the same app and uvicorn settings, bound with
``SO_REUSEPORT`` so that the kernel spreads connections over the processes (the multi-worker option of
``bench/structure.py``; ``mixinfer serve`` itself runs one process).

Every setting comes from the ``MIXINFER_*`` environment, as for ``mixinfer serve``.

Usage: ``MIXINFER_PORT=8000 python bench/reuseport_server.py`` (start it twice for two workers)
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":  # `python bench/x.py` puts bench/ first on sys.path, where bench/http.py would shadow
    sys.path[0] = str(Path(__file__).resolve().parent.parent)  # the standard library's http: use the repo root

import logging
import socket

from service.api.cli import build_app
from service.api.logs import configure_logging
from service.api.serving import Server, uvicorn_config
from service.config import Settings


def main() -> None:
    settings = Settings()
    configure_logging(settings.log_json, logging.INFO)
    app, _ = build_app(settings)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((settings.host, settings.port))
    Server(uvicorn_config(app, settings)).run(sockets=[sock])


if __name__ == "__main__":
    main()

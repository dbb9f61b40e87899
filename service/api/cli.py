"""``mixinfer serve``: check the settings and the bundle, then run uvicorn with the app factory."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fastapi import FastAPI

    from service.config import Settings

LOGGER = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction[Any]) -> None:
    """Add ``serve`` (imports nothing heavy)."""
    p = subparsers.add_parser(
        "serve",
        help="serve the configured bundle over HTTP",
        description="Serve MIXINFER_MODEL_DIR/MIXINFER_MODEL_NAME (highest or MIXINFER_MODEL_VERSION) on "
        "MIXINFER_HOST:MIXINFER_PORT. Every setting comes from MIXINFER_* environment variables; the flags "
        "below override the address only.",
    )
    p.add_argument("--host", default=None, help="bind address (default: MIXINFER_HOST, 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="port (default: MIXINFER_PORT, 8000)")
    p.set_defaults(func=serve)


def serve(args: argparse.Namespace) -> int:
    """Validate settings and the bundle (refuse at start-up, exit 2), then run uvicorn until stopped."""
    import os

    from pydantic import ValidationError

    from service.api.logs import configure_logging
    from service.api.serving import Server, uvicorn_config
    from service.config import Settings, unknown_variables
    from service.errors import MixinferError

    unknown = unknown_variables(os.environ)
    if unknown:  # Settings ignores them: a typo such as MIXINFER_API_KEY would leave the server open
        LOGGER.error("refusing to start, unknown MIXINFER_* variables:\n%s", "\n".join(unknown))
        return 2
    try:
        settings = Settings()
    except ValidationError as exc:
        LOGGER.error("refusing to start, invalid MIXINFER_* settings:\n%s", exc)
        return 2
    overrides: dict[str, Any] = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    if overrides:
        try:
            settings = Settings.model_validate({**settings.model_dump(), **overrides})
        except ValidationError as exc:
            LOGGER.error("refusing to start, invalid --host/--port:\n%s", exc)
            return 2
    configure_logging(settings.log_json, logging.DEBUG if getattr(args, "verbose", False) else logging.INFO)
    try:
        app, path = build_app(settings)
    except MixinferError as exc:
        LOGGER.error("refusing to start: %s", exc.message)
        return 2
    LOGGER.info("serving %s on http://%s:%d", path, settings.host, settings.port)
    Server(uvicorn_config(app, settings)).run()
    return 0


def build_app(settings: Settings, *, exit_on_load_failure: bool = True) -> tuple[FastAPI, Path]:
    """Resolve and verify the bundle (the start-up checks), then build the app that serves that same bundle: the
    version is resolved once and the files are read once.

    ``exit_on_load_failure``: as in :func:`service.api.app.create_app` (a test that builds the app in its own
    process turns it off).

    Raises:
        MixinferError: no such bundle, or it fails verification.
    """
    from service.api.app import create_app
    from service.store import load_bundle, resolve_bundle

    path = resolve_bundle(settings.model_dir, settings.model_name, settings.model_version)  # the one resolution
    bundle = load_bundle(path)
    return create_app(settings, exit_on_load_failure=exit_on_load_failure, bundle=bundle), path

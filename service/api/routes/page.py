"""The browser page: ``GET /`` (and ``/ui``) and its files under ``/ui/``, package data read once, served with a
strict Content-Security-Policy (no inline script or style, nothing from other origins)."""

from __future__ import annotations

import logging
from functools import cache
from importlib.resources import files
from importlib.resources.abc import Traversable

from fastapi import APIRouter
from starlette.responses import Response

from service.errors import MixinferError

LOGGER = logging.getLogger(__name__)

router = APIRouter(tags=["page"], include_in_schema=False)

#: what the page may load: its own scripts, styles and images (and the previews it makes), calls to this server
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
_MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".png": "image/png",
}


class PageFileNotFoundError(MixinferError):
    """No page file of that name."""

    status_code = 404
    code = "not_found"


@cache
def page_files() -> dict[str, tuple[bytes, str]]:
    """Every file of the page, by its path under ``/ui/``: (bytes, media type); read once, at the first request."""
    found: dict[str, tuple[bytes, str]] = {}

    def walk(node: Traversable, prefix: str) -> None:
        for child in node.iterdir():
            name = f"{prefix}{child.name}"
            if child.is_dir():
                walk(child, f"{name}/")
            elif (media := _MEDIA_TYPES.get("." + child.name.rpartition(".")[2])) is not None:
                found[name] = (child.read_bytes(), media)

    walk(files("service.api") / "static", "")
    LOGGER.debug("page files: %s", sorted(found))
    return found


def _file(name: str) -> Response:
    entry = page_files().get(name)
    if entry is None:
        raise PageFileNotFoundError(f"no page file {name!r}")
    body, media = entry
    return Response(body, media_type=media, headers=_HEADERS)


@router.get("/")
@router.get("/ui")
async def index() -> Response:
    """The page."""
    return _file("index.html")


@router.get("/ui/{name:path}")
async def page_file(name: str) -> Response:
    """A script, style sheet or sample image of the page."""
    return _file(name)

"""Read the images of a ``POST /predict`` body: multipart parts, one raw ``image/*`` body, or JSON instances."""

from __future__ import annotations

import base64
import binascii
import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np
import orjson
from fastapi import Request
from numpy.typing import NDArray
from PIL import Image
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.api.inference import INLINE_BODY_BYTES, off_loop
from service.errors import DeadlineExceededError, InvalidInputError, PayloadTooLargeError, UnsupportedMediaTypeError
from service.preprocess import MEDIA_TYPES, ImageSpec, array_to_image, convert_image, open_image

LOGGER = logging.getLogger(__name__)
_T = TypeVar("_T")

#: decode on the event loop up to this many decoded pixels per request (~0.5 ms of decoding), on a worker thread above
INLINE_DECODE_PIXELS = 64 * 1024
ACCEPTED = ("multipart/form-data", "application/json", *MEDIA_TYPES)

#: one image of a request: encoded bytes (a header read by :func:`open_image`: Pillow opens lazily) or a JSON array
Item = bytes | Image.Image | list[Any]


async def read_images(request: Request, spec: ImageSpec, max_images: int, deadline: float) -> NDArray[np.float32]:
    """All images of the request as float32 (N, C, H, W) in [0, 1].

    Where the work runs is decided by what it costs: a body over :data:`INLINE_BODY_BYTES` is parsed and decoded on a
    worker thread; otherwise the image headers are read on the event loop and the images decoded there only when
    they hold at most :data:`INLINE_DECODE_PIXELS` decoded pixels in total. The image count and the decoded pixels
    of the request (``spec.max_request_pixels``) are checked before any image is decoded.

    Raises:
        UnsupportedMediaTypeError: a content type other than :data:`ACCEPTED`.
        InvalidInputError: no image, undecodable image, bad array.
        PayloadTooLargeError: more than ``max_images`` images or too many pixels.
        DeadlineExceededError: ``deadline`` (``time.monotonic``) passed while decoding.
    """
    ctype = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if ctype == "application/json":
        body = await request.body()
        if len(body) > INLINE_BODY_BYTES:
            return await off_loop(deadline, _convert_json, body, spec, max_images, deadline)
        items = _json_items(body, max_images)
    elif ctype == "multipart/form-data":
        items = await _multipart_items(request, max_images)  # parsed chunk by chunk as the body arrives
    elif ctype in MEDIA_TYPES:
        items = [await request.body()]
    else:
        raise UnsupportedMediaTypeError(
            f"content type {ctype or '(none)'!r} is not accepted; send one of {', '.join(ACCEPTED)}"
        )
    if sum(len(i) for i in items if isinstance(i, bytes)) > INLINE_BODY_BYTES:
        return await off_loop(deadline, _convert_all, items, spec, deadline)
    opened = _open_all(items, spec)
    if _pixels(opened) > INLINE_DECODE_PIXELS:
        return await off_loop(deadline, _convert_all, opened, spec, deadline)
    return _convert_all(opened, spec, deadline)


def _convert_json(body: bytes, spec: ImageSpec, max_images: int, deadline: float) -> NDArray[np.float32]:
    return _convert_all(_json_items(body, max_images), spec, deadline)


def _open_all(items: list[Item], spec: ImageSpec) -> list[Item]:
    """Read the header of every encoded image and check the request's decoded pixels against its limit."""
    opened: list[Item] = [
        _numbered(i, len(items), open_image, item, spec) if isinstance(item, bytes) else item
        for i, item in enumerate(items)
    ]
    total = _pixels(opened)
    if total > spec.max_request_pixels:
        raise PayloadTooLargeError(
            f"the request's images hold {total} decoded pixels, the limit is {spec.max_request_pixels} per request "
            "(MIXINFER_MAX_PIXELS_PER_REQUEST)"
        )
    return opened


def _pixels(items: list[Item]) -> int:
    return sum(i.size[0] * i.size[1] for i in items if isinstance(i, Image.Image))


def _convert_all(items: list[Item], spec: ImageSpec, deadline: float) -> NDArray[np.float32]:
    """Decode or convert every image, checking ``deadline`` before each one (so a timed-out request stops)."""
    if any(isinstance(i, bytes) for i in items):
        items = _open_all(items, spec)
    out = np.empty((len(items), *spec.shape), dtype=np.float32)
    for i, item in enumerate(items):
        if time.monotonic() > deadline:
            raise DeadlineExceededError(
                f"the request timeout (MIXINFER_REQUEST_TIMEOUT_S) passed while decoding its images "
                f"({i} of {len(items)} decoded)"
            )
        if isinstance(item, Image.Image):  # decoded straight into its row: no intermediate arrays
            _numbered(i, len(items), convert_image, item, spec, out[i])
        else:
            out[i] = _numbered(i, len(items), array_to_image, item, spec)
    return out


def _numbered(i: int, n: int, fn: Callable[..., _T], item: Any, spec: ImageSpec, *more: Any) -> _T:
    """``fn(item, spec, *more)``; a refusal names the image when the request holds several."""
    try:
        return fn(item, spec, *more)
    except (InvalidInputError, PayloadTooLargeError) as exc:
        if n > 1:
            exc.message = f"image {i}: {exc.message}"
            exc.args = (exc.message,)
        raise


def _count(n: int, max_images: int) -> None:
    if n == 0:
        raise InvalidInputError("the request holds no image; send at least 1")
    if n > max_images:
        raise PayloadTooLargeError(f"the request holds {n} images, the limit is {max_images} per request")


def _json_items(body: bytes, max_images: int) -> list[Item]:
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidInputError(f"body is not valid JSON: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("instances"), list):
        raise InvalidInputError('JSON body must be an object {"instances": [...]}')
    instances: list[Any] = doc["instances"]
    _count(len(instances), max_images)
    items: list[Item] = []
    for i, inst in enumerate(instances):
        if isinstance(inst, dict):
            b64 = inst.get("b64")
            if not isinstance(b64, str) or set(inst) != {"b64"}:
                raise InvalidInputError(f'instance {i}: an object instance must be exactly {{"b64": "<base64>"}}')
            try:
                items.append(base64.b64decode(b64, validate=True))
            except (binascii.Error, ValueError):
                raise InvalidInputError(f"instance {i}: 'b64' is not valid base64") from None
        elif isinstance(inst, list):
            items.append(inst)
        else:
            raise InvalidInputError(
                f'instance {i}: expected {{"b64": ...}} or a numeric array, got {type(inst).__name__}'
            )
    return items


async def _multipart_items(request: Request, max_images: int) -> list[Item]:
    try:
        form = await request.form(max_files=max_images + 1, max_fields=max_images + 16)
    except StarletteHTTPException as exc:
        detail = str(exc.detail)
        if "Too many files" in detail:
            raise PayloadTooLargeError(f"more than {max_images} images in the request, the limit per request") from None
        raise InvalidInputError(f"malformed multipart body: {detail}") from None
    try:
        files = [v for _, v in form.multi_items() if isinstance(v, UploadFile)]
        _count(len(files), max_images)
        return [await f.read() for f in files]
    finally:
        await form.close()

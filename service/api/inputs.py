"""Read the images of a ``POST /predict`` body: multipart parts, one raw ``image/*`` body, or JSON instances."""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
from typing import Any

import numpy as np
import orjson
from fastapi import Request
from numpy.typing import NDArray
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.errors import InvalidInputError, PayloadTooLargeError, UnsupportedMediaTypeError
from service.preprocess import MEDIA_TYPES, ImageSpec, array_to_image, decode_image

LOGGER = logging.getLogger(__name__)

#: decode on the event loop below this many encoded bytes, on a worker thread above
_INLINE_DECODE_BYTES = 64 * 1024
ACCEPTED = ("multipart/form-data", "application/json", *MEDIA_TYPES)


async def read_images(request: Request, spec: ImageSpec, max_images: int) -> NDArray[np.float32]:
    """All images of the request as float32 (N, C, H, W) in [0, 1].

    Raises:
        UnsupportedMediaTypeError: a content type other than :data:`ACCEPTED`.
        InvalidInputError: no image, undecodable image, bad array.
        PayloadTooLargeError: more than ``max_images`` images or too many pixels.
    """
    ctype = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if ctype == "application/json":
        items = _json_items(await request.body(), max_images)
    elif ctype == "multipart/form-data":
        items = await _multipart_items(request, max_images)
    elif ctype in MEDIA_TYPES:
        items = [await request.body()]
    else:
        raise UnsupportedMediaTypeError(
            f"content type {ctype or '(none)'!r} is not accepted; send one of {', '.join(ACCEPTED)}"
        )
    encoded = sum(len(i) for i in items if isinstance(i, bytes))
    if encoded > _INLINE_DECODE_BYTES:
        images = await asyncio.to_thread(_convert_all, items, spec)
    else:
        images = _convert_all(items, spec)
    return images


def _convert_all(items: list[bytes | Any], spec: ImageSpec) -> NDArray[np.float32]:
    out = np.empty((len(items), *spec.shape), dtype=np.float32)
    for i, item in enumerate(items):
        try:
            out[i] = decode_image(item, spec) if isinstance(item, bytes) else array_to_image(item, spec)
        except (InvalidInputError, PayloadTooLargeError) as exc:
            if len(items) > 1:
                exc.message = f"image {i}: {exc.message}"
                exc.args = (exc.message,)
            raise
    return out


def _count(n: int, max_images: int) -> None:
    if n == 0:
        raise InvalidInputError("the request holds no image; send at least 1")
    if n > max_images:
        raise PayloadTooLargeError(f"the request holds {n} images, the limit is {max_images} per request")


def _json_items(body: bytes, max_images: int) -> list[bytes | Any]:
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidInputError(f"body is not valid JSON: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("instances"), list):
        raise InvalidInputError('JSON body must be an object {"instances": [...]}')
    instances: list[Any] = doc["instances"]
    _count(len(instances), max_images)
    items: list[bytes | Any] = []
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


async def _multipart_items(request: Request, max_images: int) -> list[bytes | Any]:
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

"""Images as the client takes them (paths, encoded bytes, PIL images, numpy arrays) -> one JSON /predict body."""

from __future__ import annotations

import base64
import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeAlias

import numpy as np

#: a path to an image file, its encoded bytes (PNG/JPEG/WebP/BMP/GIF), a PIL image, or a numpy array: (H, W) or
#: (C, H, W) at the model's input size, floats in [0, 1] or uint8 in [0, 255]; a 4-D array is a batch of them
ImageLike: TypeAlias = str | os.PathLike[str] | bytes | bytearray | memoryview | np.ndarray | Any


def predict_body(images: ImageLike | Sequence[ImageLike]) -> dict[str, list[Any]]:
    """The JSON body of ``POST /predict``: encoded images as ``{"b64": ...}``, arrays as nested lists (exact
    values, no 8-bit rounding).

    Raises:
        OSError: a path cannot be read.
        TypeError: an item of another type.
    """
    return {"instances": [_instance(item) for item in _items(images)]}


def _items(images: ImageLike | Sequence[ImageLike]) -> list[ImageLike]:
    if isinstance(images, np.ndarray):
        return list(images) if images.ndim == 4 else [images]
    if isinstance(images, list | tuple):
        return list(images)
    return [images]


def _instance(item: ImageLike) -> Any:
    if isinstance(item, str | os.PathLike):
        return _b64(Path(item).read_bytes())
    if isinstance(item, bytes | bytearray | memoryview):
        return _b64(bytes(item))
    if isinstance(item, np.ndarray):
        array = item / 255.0 if item.dtype == np.uint8 else item.astype(np.float64, copy=False)
        return array.tolist()
    if type(item).__module__.startswith("PIL."):  # a PIL image: no PIL import unless one is given
        buf = io.BytesIO()
        item.save(buf, "PNG")
        return _b64(buf.getvalue())
    raise TypeError(
        f"cannot send a {type(item).__name__} as an image; expected a path, encoded bytes, a PIL image or a numpy array"
    )


def _b64(data: bytes) -> dict[str, str]:
    return {"b64": base64.b64encode(data).decode("ascii")}

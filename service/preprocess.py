"""Client bytes and arrays -> validated float32 (C, H, W) images in [0, 1] at the model's input size."""

from __future__ import annotations

import io
import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeAlias

import numpy as np
from numpy.typing import NDArray
from PIL import Image, ImageOps, UnidentifiedImageError

from service.errors import InvalidInputError, PayloadTooLargeError

LOGGER = logging.getLogger(__name__)

#: float32 (C, H, W), pixels in [0, 1]
Image3D: TypeAlias = NDArray[np.float32]

#: Pillow format names we decode; anything else (TIFF, PSD, EPS, ...) is refused before parsing.
FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF")
MEDIA_TYPES = ("image/png", "image/jpeg", "image/webp", "image/bmp", "image/gif")
_ALPHA_MODES = ("RGBA", "LA", "PA", "La", "RGBa")


@dataclass(frozen=True)
class ImageSpec:
    """What the model takes: ``channels`` (1 or 3) x ``height`` x ``width`` float32 in [0, 1].

    Attributes:
        channels: 1 (grayscale, ITU-R 601 luma) or 3 (RGB).
        height: rows of one image.
        width: columns of one image.
        strict_size: refuse images of another size instead of resizing them.
        max_pixels: refuse images with more decoded pixels than this (decompression bombs), before decoding.
        max_request_pixels: refuse requests whose images decode to more pixels than this in total, before decoding.
    """

    channels: int
    height: int
    width: int
    strict_size: bool = False
    max_pixels: int = 16 * 1024 * 1024
    max_request_pixels: int = 64 * 1024 * 1024

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.channels, self.height, self.width)


def decode_image(data: bytes, spec: ImageSpec) -> Image3D:
    """Decode one encoded image (PNG/JPEG/WebP/BMP/GIF) into the model's input: :func:`open_image` then
    :func:`convert_image`.

    Raises:
        InvalidInputError: empty or undecodable bytes, or (strict size) another size.
        PayloadTooLargeError: more than ``spec.max_pixels`` pixels.
    """
    return convert_image(open_image(data, spec), spec)


def open_image(data: bytes, spec: ImageSpec) -> Image.Image:
    """Read only the header of an encoded image (Pillow opens lazily): its format and size, the pixel check.

    Cheap whatever the image decodes to, so callers can sum the decoded pixels of a request before decoding any.

    Raises:
        InvalidInputError: empty bytes, or not a PNG/JPEG/WebP/BMP/GIF header.
        PayloadTooLargeError: more than ``spec.max_pixels`` pixels.
    """
    if not data:
        raise InvalidInputError("image is empty (0 bytes), expected an encoded PNG/JPEG/WebP/BMP/GIF image")
    with _image_errors():
        im: Image.Image = Image.open(io.BytesIO(data), formats=FORMATS)
    width, height = im.size
    if width * height > spec.max_pixels:
        raise PayloadTooLargeError(
            f"image has {width}x{height} = {width * height} pixels, the limit is {spec.max_pixels}"
        )
    return im


def convert_image(im: Image.Image, spec: ImageSpec, out: Image3D | None = None) -> Image3D:
    """Decode an image from :func:`open_image` into the model's input: :func:`image_pixels` / 255, computed in
    float32 in one pass over the decoded pixels, into ``out`` (e.g. the request's row of its batch) when given."""
    pixels = image_pixels(im, spec)
    if out is None:
        out = np.empty(pixels.shape, dtype=np.float32)
    return np.multiply(pixels, np.float32(1.0 / 255.0), out=out)


def image_pixels(im: Image.Image, spec: ImageSpec) -> NDArray[np.uint8]:
    """Decode an opened image into the model's uint8 (C, H, W) pixels: the one rule of the server and of
    ``imagefolder`` datasets (so the pool, calibration and test images are what the server sees for those files).

    Rules, in order: take the first frame; apply the EXIF orientation; scale 16-bit to 8-bit; composite any alpha
    onto black; convert to the model's channels (luma for 1 channel); resize to the model's size (area average when
    shrinking, bilinear when enlarging) unless ``spec.strict_size``.

    Raises:
        InvalidInputError: undecodable (e.g. truncated) pixels, or (strict size) another size.
    """
    with _image_errors():
        im.seek(0)
        im.load()
        ImageOps.exif_transpose(im, in_place=True)  # in place: no copy of an upright image
        im = _to_model_mode(im, spec.channels)
    if im.size != (spec.width, spec.height):
        if spec.strict_size:
            raise InvalidInputError(
                f"image is {im.size[0]}x{im.size[1]} (WxH), expected exactly {spec.width}x{spec.height} "
                "(the server runs with STRICT_SIZE)"
            )
        shrink = im.size[0] >= spec.width and im.size[1] >= spec.height
        # area averaging when shrinking (exact on block-scaled images), bilinear when enlarging
        im = im.resize((spec.width, spec.height), Image.Resampling.BOX if shrink else Image.Resampling.BILINEAR)
    arr = np.asarray(im, dtype=np.uint8)
    return arr[None, :, :] if arr.ndim == 2 else arr.transpose(2, 0, 1)  # a view: callers copy once


@contextmanager
def _image_errors() -> Iterator[None]:
    """Pillow's exceptions (and its decompression-bomb warning) as our 400 and 413 errors."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise PayloadTooLargeError(f"image refused as a decompression bomb: {exc}") from None
    except UnidentifiedImageError:
        raise InvalidInputError("could not identify the image format; expected PNG, JPEG, WebP, BMP or GIF") from None
    except (OSError, ValueError, SyntaxError, EOFError, IndexError) as exc:
        raise InvalidInputError(
            f"could not decode the image ({type(exc).__name__}: {exc}); it may be truncated"
        ) from None


def _to_model_mode(im: Image.Image, channels: int) -> Image.Image:
    """8-bit ``L`` or ``RGB``: 16-bit scaled to 8-bit, palette expanded, alpha composited onto black."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        wide = np.asarray(im, dtype=np.float64)
        scale = 257.0 if im.mode != "I" or wide.max(initial=0) > 255 else 1.0
        im = Image.fromarray(np.clip(np.rint(wide / scale), 0, 255).astype(np.uint8), mode="L")
    elif im.mode == "F":
        raise InvalidInputError("floating-point images are not accepted, send 8- or 16-bit images")
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in _ALPHA_MODES:
        rgba = im.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        im = Image.alpha_composite(black, rgba).convert("RGB")
    target = "L" if channels == 1 else "RGB"
    if im.mode != target:
        im = im.convert(target)
    return im


def array_to_image(values: object, spec: ImageSpec) -> Image3D:
    """A numeric array from JSON, shaped (H, W) (one channel only) or (C, H, W), values in [0, 1], never resized.

    Raises:
        InvalidInputError: ragged, non-numeric, wrong shape, NaN/inf or out of [0, 1].
    """
    arr = numeric_array(values, "instance")
    if arr.ndim == 2 and spec.channels == 1:
        arr = arr[None]
    if arr.shape != spec.shape:
        allowed = f"{spec.shape}" + (f" or {spec.shape[1:]}" if spec.channels == 1 else "")
        raise InvalidInputError(f"array instance must be shaped {allowed} (C,H,W), got {arr.shape}")
    check_pixel_values(arr)
    return np.ascontiguousarray(arr)


def numeric_array(values: object, what: str) -> NDArray[np.float32]:
    """JSON values (nested lists) as float32, refusing anything but numbers: numpy alone would read the string
    ``"0.5"`` as 0.5 and ``true`` as 1.0 (a list mixing booleans and numbers still reads as numbers).

    Raises:
        InvalidInputError: ragged, or strings, booleans, nulls or objects among the values.
    """
    try:
        arr = np.asarray(values)
    except (ValueError, TypeError) as exc:
        raise InvalidInputError(f"{what} is not a rectangular numeric array ({exc})") from None
    if arr.dtype.kind not in "iuf":
        kinds = {"b": "booleans", "U": "strings", "O": "nulls, objects or integers beyond 64 bits"}
        got = kinds.get(arr.dtype.kind, arr.dtype.name)
        raise InvalidInputError(f"{what} must hold JSON numbers only, got {got}")
    return arr.astype(np.float32, copy=False)


def check_pixel_values(arr: NDArray[np.float32]) -> None:
    """Refuse NaN, infinities and values outside [0, 1], saying how many and where."""
    finite = np.isfinite(arr)
    if not finite.all():
        raise InvalidInputError(f"pixel values must be finite, got {int((~finite).sum())} NaN or infinite values")
    lo, hi = float(arr.min()), float(arr.max())
    if lo < 0.0 or hi > 1.0:
        raise InvalidInputError(f"pixel values must lie in [0, 1], got values in [{lo:g}, {hi:g}]")

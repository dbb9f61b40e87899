"""Image decoding and array validation: every conversion rule against an independent expectation."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from service.errors import InvalidInputError, PayloadTooLargeError
from service.preprocess import ImageSpec, array_to_image, decode_image

GRAY8 = ImageSpec(1, 8, 8)
RGB8 = ImageSpec(3, 8, 8)


def encode(im: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kwargs)
    return buf.getvalue()


def ramp(h: int = 8, w: int = 8) -> np.ndarray:
    return (np.arange(h * w).reshape(h, w) * 3 % 256).astype(np.uint8)


def test_png_gray_at_model_size_is_pixels_over_255():
    px = ramp()
    out = decode_image(encode(Image.fromarray(px)), GRAY8)
    assert out.dtype == np.float32 and out.shape == (1, 8, 8)
    np.testing.assert_allclose(out[0], px / 255.0, atol=1e-7)


@pytest.mark.parametrize("fmt", ["PNG", "BMP", "GIF"])
def test_lossless_formats_round_trip(fmt):
    px = ramp()
    out = decode_image(encode(Image.fromarray(px), fmt), GRAY8)
    np.testing.assert_allclose(out[0], px / 255.0, atol=1e-7)


@pytest.mark.parametrize(("fmt", "kwargs"), [("WEBP", {"lossless": True}), ("JPEG", {"quality": 100})])
def test_webp_and_jpeg_decode(fmt, kwargs):
    px = np.full((8, 8), 200, np.uint8)
    out = decode_image(encode(Image.fromarray(px), fmt, **kwargs), GRAY8)
    np.testing.assert_allclose(out[0], 200 / 255.0, atol=3 / 255)


def test_exif_orientation_is_applied():
    px = np.zeros((8, 8), np.uint8)
    px[0, :4] = 255  # a bar in the top-left, as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # stored image must be rotated 90 degrees clockwise for display
    out = decode_image(encode(Image.fromarray(px), "PNG", exif=exif), GRAY8)
    expected = np.rot90(px, k=-1) / 255.0  # clockwise
    np.testing.assert_allclose(out[0], expected, atol=1e-7)
    assert not np.allclose(out[0], px / 255.0)


def test_first_frame_of_an_animation_is_used():
    frames = [Image.fromarray(np.full((8, 8), v, np.uint8)) for v in (30, 220)]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    assert Image.open(io.BytesIO(data)).n_frames == 2
    out = decode_image(data, GRAY8)
    np.testing.assert_allclose(out, 30 / 255.0, atol=1e-7)


def test_alpha_is_composited_onto_black():
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., :3] = 255
    rgba[..., 3] = 128
    rgba[0, 0, 3] = 0  # fully transparent white -> black
    out = decode_image(encode(Image.fromarray(rgba, "RGBA")), RGB8)
    assert out.shape == (3, 8, 8)
    np.testing.assert_allclose(out[:, 1, 1], 128 / 255.0, atol=1 / 255)
    np.testing.assert_allclose(out[:, 0, 0], 0.0, atol=1e-7)


def test_palette_transparency_is_composited_onto_black():
    im = Image.new("P", (8, 8), 1)
    im.putpalette([255, 255, 255, 200, 100, 50] + [0] * 762)
    im.info["transparency"] = 1
    out = decode_image(encode(im, "PNG", transparency=1), RGB8)
    np.testing.assert_allclose(out, 0.0, atol=1e-7)


def test_16_bit_is_scaled_to_8_bit():
    wide = np.full((8, 8), 257 * 100, np.uint16)
    wide[0, 0] = 65535
    out = decode_image(encode(Image.fromarray(wide)), GRAY8)
    assert out[0, 0, 0] == pytest.approx(1.0)
    np.testing.assert_allclose(out[0, 1:, :], 100 / 255.0, atol=1e-7)


def test_rgb_to_one_channel_uses_luma_and_gray_to_rgb_replicates():
    red = np.zeros((8, 8, 3), np.uint8)
    red[..., 0] = 255
    out = decode_image(encode(Image.fromarray(red, "RGB")), GRAY8)
    np.testing.assert_allclose(out, round(255 * 299 / 1000) / 255.0, atol=1 / 255)
    gray = decode_image(encode(Image.fromarray(np.full((8, 8), 90, np.uint8))), RGB8)
    np.testing.assert_allclose(gray, 90 / 255.0, atol=1e-7)
    assert gray.shape == (3, 8, 8)


def test_other_sizes_are_resized_unless_strict():
    big = Image.fromarray(np.full((24, 16), 77, np.uint8))
    out = decode_image(encode(big), GRAY8)
    assert out.shape == (1, 8, 8)
    np.testing.assert_allclose(out, 77 / 255.0, atol=1e-6)
    strict = ImageSpec(1, 8, 8, strict_size=True)
    with pytest.raises(InvalidInputError, match=r"16x24 \(WxH\), expected exactly 8x8"):
        decode_image(encode(big), strict)


def _png_claiming(width: int, height: int) -> bytes:
    """A real 8x8 PNG whose IHDR claims another size: decoding it for real would need width*height bytes."""
    png = bytearray(encode(Image.fromarray(np.zeros((8, 8), np.uint8))))
    body = png[12:16] + struct.pack(">II", width, height) + png[24:29]
    png[12:29] = body
    png[29:33] = struct.pack(">I", zlib.crc32(bytes(body)))
    return bytes(png)


@pytest.mark.parametrize(("side", "needle"), [(9000, "9000x9000 = 81000000 pixels"), (30000, "decompression bomb")])
def test_pixel_limit_is_checked_before_decoding(side, needle):
    with pytest.raises(PayloadTooLargeError, match=needle):
        decode_image(_png_claiming(side, side), ImageSpec(1, 8, 8, max_pixels=4096))


def test_pixel_limit_counts_the_source_image():
    data = encode(Image.fromarray(np.zeros((100, 100), np.uint8)))
    with pytest.raises(PayloadTooLargeError, match="10000 pixels, the limit is 5000"):
        decode_image(data, ImageSpec(1, 8, 8, max_pixels=5000))


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        (b"", "empty"),
        (b"not an image at all", "could not identify"),
        (encode(Image.fromarray(ramp()), "TIFF"), "could not identify"),
        (encode(Image.fromarray(ramp(64, 64)))[:-40], "could not decode"),
    ],
)
def test_undecodable_bytes_are_invalid_input(data, needle):
    with pytest.raises(InvalidInputError, match=needle):
        decode_image(data, GRAY8)


def test_arrays_two_and_three_dimensional():
    px = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    np.testing.assert_array_equal(array_to_image(px.tolist(), GRAY8)[0], px)
    np.testing.assert_array_equal(array_to_image([px.tolist()], GRAY8)[0], px)
    rgb = np.stack([px, px / 2, px / 4])
    np.testing.assert_array_equal(array_to_image(rgb.tolist(), RGB8), rgb)


@pytest.mark.parametrize(
    ("values", "needle"),
    [
        (np.zeros((8, 8)).tolist(), r"shaped \(3, 8, 8\)"),  # (H, W) only for 1-channel models
        (np.zeros((3, 9, 8)).tolist(), r"got \(3, 9, 8\)"),
        ([[0.1, 0.2], [0.3]], "rectangular numeric"),
        ([["a"] * 8] * 8, "JSON numbers only, got strings"),
        ([["0.5"] * 8] * 8, "JSON numbers only, got strings"),  # numpy alone reads "0.5" as 0.5
        ([[True] * 8] * 8, "JSON numbers only, got booleans"),
    ],
)
def test_bad_arrays_are_refused(values, needle):
    with pytest.raises(InvalidInputError, match=needle):
        array_to_image(values, RGB8)


@pytest.mark.parametrize(
    ("bad", "needle"), [(float("nan"), "finite"), (float("inf"), "finite"), (1.5, r"\[0, 1\]"), (-0.1, r"\[0, 1\]")]
)
def test_non_finite_and_out_of_range_values_are_refused(bad, needle):
    px = np.zeros((8, 8))
    px[3, 4] = bad
    with pytest.raises(InvalidInputError, match=needle):
        array_to_image(px.tolist(), GRAY8)

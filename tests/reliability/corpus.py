"""The hostile and unusual input corpus, generated in code (Pillow, zlib, struct): no committed binaries.

Every :class:`Case` is one HTTP request and what a correct server must answer: a status from ``statuses`` and,
for the valid-but-unusual images, the pixels the model must see (``expect``: uint8 (C, H, W) at the model's size),
against which the test compares the served plain probabilities with its own ONNX Runtime run.

The model of the corpus server takes RGB 16x16 (see ``test_reliability_corpus.py``).
"""

from __future__ import annotations

import base64
import io
import json
import struct
import zlib
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, PngImagePlugin

C, H, W = 3, 16, 16
OIP_INPUT = "images"


@dataclass(frozen=True)
class Case:
    """One request of the corpus."""

    name: str
    path: str
    body: bytes
    headers: dict[str, str]
    statuses: frozenset[int]
    expect: np.ndarray | None = None  #: uint8 (C, H, W) the model must see (only for 200 answers)
    #: JSON error code expected in a 4xx body (None: any documented code)
    error_code: str | None = None
    chunked: bool = False
    tags: tuple[str, ...] = field(default=())


def _rng() -> np.random.Generator:
    return np.random.default_rng(1234)


def base_image() -> np.ndarray:
    """uint8 (H, W, 3): a smooth gradient plus noise, so that orientation and channel errors change the answer."""
    rng = _rng()
    yy, xx = np.mgrid[0:H, 0:W]
    img = np.stack([xx * 15, yy * 15, (xx + yy) * 7], axis=-1) + rng.integers(0, 16, size=(H, W, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def chw(hwc: np.ndarray) -> np.ndarray:
    if hwc.ndim == 2:
        hwc = np.repeat(hwc[:, :, None], 3, axis=2)
    return np.ascontiguousarray(hwc.transpose(2, 0, 1))


def encode(im: Image.Image, fmt: str, **params: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **params)
    return buf.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def raw_png(width: int, height: int, idat: bytes, *, bit_depth: int = 8, color_type: int = 0) -> bytes:
    """A PNG from its parts (to declare sizes the pixels do not have)."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def bomb_png(side: int) -> bytes:
    """A real decompression bomb: ``side`` x ``side`` grey zeros, a few KB compressed."""
    row = b"\x00" + b"\x00" * side
    comp = zlib.compressobj(9)
    parts = [comp.compress(row) for _ in range(side)]
    parts.append(comp.flush())
    return raw_png(side, side, b"".join(parts))


def oip(
    shape: list[int],
    data: object = None,
    *,
    datatype: str = "FP32",
    name: str = OIP_INPUT,
    binary: bytes | None = None,
    mode: str | None = None,
) -> tuple[bytes, dict[str, str]]:
    """An OIP v2 infer body (JSON, or JSON header + binary tensor) and its headers; ``mode`` as a parameter."""
    inp: dict[str, object] = {"name": name, "datatype": datatype, "shape": shape}
    doc: dict[str, object] = {"inputs": [inp]}
    if mode is not None:
        doc["parameters"] = {"mode": mode}
    if binary is None:
        inp["data"] = data
        return json.dumps(doc).encode(), {"Content-Type": "application/json"}
    inp["parameters"] = {"binary_data_size": len(binary)}
    head = json.dumps(doc).encode()
    return head + binary, {
        "Content-Type": "application/octet-stream",
        "Inference-Header-Content-Length": str(len(head)),
    }


def multipart(parts: list[tuple[str, bytes, str]], boundary: str = "relbound") -> tuple[bytes, dict[str, str]]:
    out = b""
    for i, (field_name, data, ctype) in enumerate(parts):
        out += (
            (
                f'--{boundary}\r\nContent-Disposition: form-data; name="{field_name}"; filename="f{i}"\r\n'
                f"Content-Type: {ctype}\r\n\r\n"
            ).encode()
            + data
            + b"\r\n"
        )
    out += f"--{boundary}--\r\n".encode()
    return out, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def build_corpus(max_body_bytes: int, max_images: int, max_request_pixels: int, oip_path: str) -> list[Case]:
    """Every case; ``max_body_bytes``, ``max_images`` and ``max_request_pixels`` (decoded pixels per request, also the
    per-image limit) are the server's limits, ``oip_path`` its infer route."""
    base = base_image()
    base_chw = chw(base)
    png = encode(Image.fromarray(base), "PNG")
    jpeg = encode(Image.fromarray(base), "JPEG", quality=95)
    ok = frozenset({200})
    bad = frozenset({400})
    cases: list[Case] = []

    def add(name: str, body: bytes, statuses: frozenset[int], *, ctype: str | None = "image/png",
            expect: np.ndarray | None = None, path: str = "/predict", headers: dict[str, str] | None = None,
            code: str | None = None, chunked: bool = False) -> None:  # fmt: skip
        h = dict(headers or {})
        if ctype is not None and "Content-Type" not in h:
            h["Content-Type"] = ctype
        cases.append(Case(name, path, body, h, statuses, expect, code, chunked))

    # --- broken encodings --------------------------------------------------------------------------------------
    add("empty_body", b"", bad, code="invalid_input")
    add("png_signature_only", png[:8], bad, code="invalid_input")
    add("png_truncated_half", png[: len(png) // 2], bad, code="invalid_input")
    add("png_truncated_in_idat", png[:-60], bad, code="invalid_input")
    # only the zlib checksum, the chunk CRC and IEND are missing: every pixel is there, both answers are fine
    add("png_missing_crc_and_iend", png[:-20], frozenset({200, 400}), expect=base_chw)
    crc_broken = bytearray(png)
    idat_at = png.index(b"IDAT")
    crc_broken[idat_at + 8] ^= 0xFF  # a data byte: the chunk CRC no longer matches (zlib may also fail)
    add("png_bad_crc", bytes(crc_broken), bad, code="invalid_input")
    add("png_zero_width", raw_png(0, 16, zlib.compress(b"")), bad, code="invalid_input")
    add("png_zero_height", raw_png(16, 0, zlib.compress(b"")), bad, code="invalid_input")
    add("png_bad_zlib", raw_png(16, 16, b"not zlib at all"), bad, code="invalid_input")
    add("png_bad_color_type", raw_png(16, 16, zlib.compress(b"\x00" * 17 * 16), color_type=5), bad)
    add("random_bytes_as_png", _rng().integers(0, 256, 4096, dtype=np.uint8).tobytes(), bad, code="invalid_input")
    add("text_as_png", b"hello, I am not an image\n" * 10, bad, code="invalid_input")
    add("jpeg_truncated", jpeg[: len(jpeg) // 2], bad, ctype="image/jpeg", code="invalid_input")
    add("jpeg_soi_only", b"\xff\xd8\xff", bad, ctype="image/jpeg", code="invalid_input")
    corrupt = bytearray(jpeg)
    for i in range(len(corrupt) // 2, len(corrupt) // 2 + 40):
        corrupt[i] = 0xFF if corrupt[i] != 0xFF else 0x00
    # a corrupted scan may still decode to (garbage) pixels: either answer is correct, a 5xx is not
    add("jpeg_corrupt_scan", bytes(corrupt), frozenset({200, 400}), ctype="image/jpeg")
    add("gif_header_only", b"GIF89a\x10\x00\x10\x00", bad, ctype="image/gif", code="invalid_input")
    add("bmp_truncated", encode(Image.fromarray(base), "BMP")[:60], bad, ctype="image/bmp", code="invalid_input")
    add("webp_truncated", encode(Image.fromarray(base), "WEBP", lossless=True)[:40], bad, ctype="image/webp")
    tiff = encode(Image.fromarray(base), "TIFF")
    add("tiff_sent_as_png", tiff, bad, code="invalid_input")  # TIFF is never parsed, whatever the header says
    add("psd_like_magic", b"8BPS" + b"\x00" * 200, bad, code="invalid_input")

    # --- polyglots and mislabelled types -----------------------------------------------------------------------
    add("png_with_zip_appended", png + b"PK\x03\x04" + b"\x00" * 100, ok, expect=base_chw)
    add("png_with_html_appended", png + b"<html><script>alert(1)</script></html>", ok, expect=base_chw)
    add("gifar_js_polyglot", b"GIF89a/*\x00\x00*/=1;alert(1);" + b"\x00" * 64, frozenset({400, 413}), ctype="image/gif")
    add("jpeg_labelled_png", jpeg, ok)  # decoded by content; the label is only a hint
    add("png_labelled_jpeg", png, ok, ctype="image/jpeg", expect=base_chw)

    # --- sizes and bombs ---------------------------------------------------------------------------------------
    add("decompression_bomb_5000px", bomb_png(5000), frozenset({413}), code="payload_too_large")
    add("declared_huge_dims", raw_png(100_000, 100_000, zlib.compress(b"\x00" * 10)), frozenset({413}))
    add("declared_max_int_dims", raw_png(2**31 - 1, 2**31 - 1, zlib.compress(b"\x00")), frozenset({400, 413}))
    tiny = Image.fromarray(base[:1, :1])
    add("one_pixel", encode(tiny, "PNG"), ok, expect=np.repeat(np.repeat(chw(base[:1, :1]), H, 1), W, 2))
    add("very_wide_4096x1", encode(Image.fromarray(np.zeros((1, 4096, 3), np.uint8)), "PNG"), ok)
    # issue 13: decoded pixels per request are bounded, from the headers, before any image is decoded
    side = int((max_request_pixels * 0.6) ** 0.5)  # two such images are within the per-image limit, not together
    wide = encode(Image.fromarray(np.zeros((side, side), np.uint8), "L"), "PNG")
    body, hdr = multipart([("images", wide, "image/png")] * 2)
    add("pixels_over_request_limit_multipart", body, frozenset({413}), ctype=None, headers=hdr,
        code="payload_too_large")  # fmt: skip
    add("pixels_over_request_limit_json_b64", json.dumps({"instances": [{"b64": base64.b64encode(wide).decode()}] * 2})
        .encode(), frozenset({413}), ctype="application/json", code="payload_too_large")  # fmt: skip
    add("pixels_within_request_limit", wide, ok)
    big = np.repeat(np.repeat(base, 2, axis=0), 2, axis=1)  # 32x32 of 2x2 blocks: area average is exact
    add("larger_block_scaled", encode(Image.fromarray(big), "PNG"), ok, expect=base_chw)

    # --- valid but unusual images (converted and classified correctly) -------------------------------------------
    grey = base[:, :, 0]
    add("grey_8bit_to_rgb", encode(Image.fromarray(grey, "L"), "PNG"), ok, expect=chw(grey))
    grey16 = grey.astype(np.uint16) * 257
    add("grey_16bit", encode(Image.fromarray(grey16.astype("<u2")), "PNG"), ok, expect=chw(grey))
    add(
        "bilevel_1bit",
        encode(Image.fromarray(grey >= 128), "PNG"),
        ok,
        expect=chw(np.where(grey >= 128, 255, 0).astype(np.uint8)),
    )
    pal = Image.fromarray(base).quantize(colors=16, method=Image.Quantize.MEDIANCUT)
    add("palette", encode(pal, "PNG"), ok, expect=chw(np.asarray(pal.convert("RGB"))))
    pal_t = pal.copy()
    pal_t.info["transparency"] = 0
    pal_rgba = np.asarray(pal.convert("RGB")).copy()
    pal_rgba[np.asarray(pal) == 0] = 0  # index 0 fully transparent -> black
    add("palette_transparent", encode(pal_t, "PNG", transparency=0), ok, expect=chw(pal_rgba))
    alpha = np.linspace(0, 255, H * W).reshape(H, W).astype(np.uint8)
    alpha[0, 0], alpha[0, 1] = 0, 255
    rgba = np.dstack([base, alpha])
    composited = ((base.astype(np.uint32) * alpha[:, :, None] + 127) // 255).astype(np.uint8)
    add("rgba_on_black", encode(Image.fromarray(rgba, "RGBA"), "PNG"), ok, expect=chw(composited))
    la = np.dstack([grey, alpha])
    la_expect = ((grey.astype(np.uint32) * alpha + 127) // 255).astype(np.uint8)
    add("grey_alpha", encode(Image.fromarray(la, "LA"), "PNG"), ok, expect=chw(la_expect))
    cmyk = Image.fromarray(base).convert("CMYK")
    add("cmyk_jpeg", encode(cmyk, "JPEG", quality=95), ok, ctype="image/jpeg",
        expect=chw(np.asarray(Image.open(io.BytesIO(encode(cmyk, "JPEG", quality=95))).convert("RGB"))))  # fmt: skip
    frames = [Image.fromarray(base), Image.fromarray(255 - base)]
    gif = encode(frames[0].quantize(256), "GIF", save_all=True, append_images=[frames[1].quantize(256)], duration=50)
    add("animated_gif_first_frame", gif, ok, ctype="image/gif",
        expect=chw(np.asarray(Image.open(io.BytesIO(gif)).convert("RGB"))))  # fmt: skip
    apng = encode(frames[0], "PNG", save_all=True, append_images=[frames[1]], duration=50)
    add("animated_png_first_frame", apng, ok, expect=base_chw)
    for orientation, stored in ((3, np.rot90(base, 2)), (6, np.rot90(base, 1)), (8, np.rot90(base, -1))):
        exif = Image.Exif()
        exif[0x0112] = orientation
        im = Image.fromarray(np.ascontiguousarray(stored))
        add(f"exif_orientation_{orientation}_png", encode(im, "PNG", exif=exif.tobytes()), ok, expect=base_chw)
    exif = Image.Exif()
    exif[0x0112] = 6
    exif_jpeg = encode(Image.fromarray(np.ascontiguousarray(np.rot90(base, 1))), "JPEG", quality=95, exif=exif)
    upright = np.rot90(np.asarray(Image.open(io.BytesIO(exif_jpeg)).convert("RGB")), -1)  # what the viewer shows
    add("exif_orientation_6_jpeg", exif_jpeg, ok, ctype="image/jpeg", expect=chw(np.ascontiguousarray(upright)))
    add("interlaced_png", _interlaced_png(base), ok, expect=base_chw)
    add("bmp", encode(Image.fromarray(base), "BMP"), ok, ctype="image/bmp", expect=base_chw)
    add("webp_lossless", encode(Image.fromarray(base), "WEBP", lossless=True), ok, ctype="image/webp",
        expect=base_chw)  # fmt: skip
    add("progressive_jpeg", encode(Image.fromarray(base), "JPEG", quality=90, progressive=True), ok,
        ctype="image/jpeg")  # fmt: skip
    text = PngImagePlugin.PngInfo()
    text.add_text("comment", "x" * 200_000, zip=True)
    add("png_huge_ztxt", encode(Image.fromarray(base), "PNG", pnginfo=text), frozenset({200, 400}))

    # --- content types and bodies ------------------------------------------------------------------------------
    add("text_plain", png, frozenset({415}), ctype="text/plain", code="unsupported_media_type")
    add("no_content_type", png, frozenset({415}), ctype=None, code="unsupported_media_type")
    add("image_tiff_type", tiff, frozenset({415}), ctype="image/tiff", code="unsupported_media_type")
    add("weird_content_type", png, frozenset({415}), ctype="application/x-\u00ff\u00fe; charset=\u00e9")
    add("oversized_declared", b"\x00" * (max_body_bytes + 1), frozenset({413}), code="payload_too_large")
    add("oversized_chunked", b"\x00" * (max_body_bytes + 1), frozenset({413}), chunked=True)
    # issue 13: far past the socket buffers; the client sends it all before reading and must still read the 413
    add("oversized_declared_24mib", b"\x00" * (24 << 20), frozenset({413}), code="payload_too_large")
    add("oversized_chunked_24mib", b"\x00" * (24 << 20), frozenset({413}), chunked=True)
    body, hdr = multipart([("images", png, "image/png")] * (max_images + 1))
    add("too_many_images_multipart", body, frozenset({413}), ctype=None, headers=hdr, code="payload_too_large")
    body, hdr = multipart([("images", png, "image/png"), ("images", b"junk", "image/png")])
    add("multipart_one_bad_image", body, bad, ctype=None, headers=hdr, code="invalid_input")
    add("multipart_no_boundary", png, frozenset({400}), ctype="multipart/form-data")
    body, hdr = multipart([])
    add("multipart_no_files", body, bad, ctype=None, headers=hdr)
    body, hdr = multipart([("images", png, "image/png")])
    add("multipart_truncated", body[: len(body) // 2], bad, ctype=None, headers=hdr)

    # --- JSON ----------------------------------------------------------------------------------------------------
    def js(obj: object) -> bytes:
        return json.dumps(obj).encode()

    f = (base_chw / 255.0).tolist()
    add("json_array_ok", js({"instances": [f]}), ok, ctype="application/json", expect=base_chw)
    add("json_b64_ok", js({"instances": [{"b64": base64.b64encode(png).decode()}]}), ok, ctype="application/json",
        expect=base_chw)  # fmt: skip
    add("json_malformed", b'{"instances": [', bad, ctype="application/json")
    add("json_not_object", js([1, 2, 3]), bad, ctype="application/json")
    add("json_empty_instances", js({"instances": []}), bad, ctype="application/json")
    add("json_deeply_nested_100k", b"[" * 100_000 + b"]" * 100_000, bad, ctype="application/json")
    nested: object = 0.5
    for _ in range(300):
        nested = [nested]
    add("json_nested_instance", js({"instances": [nested]}), bad, ctype="application/json")
    add("json_nan_literal", b'{"instances": [[[NaN]]]}', bad, ctype="application/json")
    inf_arr = np.full((C, H, W), 0.5).tolist()
    inf_arr[0][0][0] = 1e400
    add("json_inf_value", js({"instances": [inf_arr]}).replace(b"Infinity", b"1e400"), bad, ctype="application/json")
    add("json_out_of_range", js({"instances": [np.full((C, H, W), 1.5).tolist()]}), bad, ctype="application/json")
    add("json_negative", js({"instances": [np.full((C, H, W), -0.1).tolist()]}), bad, ctype="application/json")
    add("json_wrong_channels", js({"instances": [np.zeros((2, H, W)).tolist()]}), bad, ctype="application/json")
    add("json_four_channels", js({"instances": [np.zeros((4, H, W)).tolist()]}), bad, ctype="application/json")
    add("json_hw_for_rgb_model", js({"instances": [np.zeros((H, W)).tolist()]}), bad, ctype="application/json")
    add("json_ragged", js({"instances": [[[0.1, 0.2], [0.3]]]}), bad, ctype="application/json")
    add("json_strings", js({"instances": [[["a"] * W] * H]}), bad, ctype="application/json")
    # numbers written as strings, booleans, nulls: numpy would read "0.5" as 0.5 and true as 1.0
    add("json_numeric_strings", js({"instances": [[[["0.5"] * W] * H] * C]}), bad, ctype="application/json")
    add("json_booleans", js({"instances": [[[[True] * W] * H] * C]}), bad, ctype="application/json")
    add("json_nulls", js({"instances": [[[[None] * W] * H] * C]}), bad, ctype="application/json")
    add("json_bad_b64", js({"instances": [{"b64": "@@@not base64@@@"}]}), bad, ctype="application/json")
    add("json_b64_not_image", js({"instances": [{"b64": base64.b64encode(b"hello").decode()}]}), bad,
        ctype="application/json")  # fmt: skip
    add("json_too_many_instances", js({"instances": [f] * (max_images + 1)}), frozenset({413}),
        ctype="application/json")  # fmt: skip
    add("json_huge_number", b'{"instances": [' + b"9" * 5000 + b"]}", bad, ctype="application/json")
    add("json_invalid_utf8", b'{"instances": ["\xff\xfe"]}', bad, ctype="application/json")

    # --- OIP v2 tensors ------------------------------------------------------------------------------------------
    def add_oip(name: str, pair: tuple[bytes, dict[str, str]], statuses: frozenset[int] = bad, **kw: object) -> None:
        add(name, pair[0], statuses, ctype=None, headers=pair[1], path=oip_path, **kw)  # type: ignore[arg-type]

    good = (base_chw / 255.0).astype("<f4")
    add_oip("oip_json_ok", oip([1, C, H, W], good.reshape(-1).tolist(), mode="off"), ok, expect=base_chw)
    add_oip("oip_binary_ok", oip([1, C, H, W], binary=good.tobytes(), mode="off"), ok, expect=base_chw)
    # FP32 is the one datatype the metadata advertises: every other one is refused, however well formed
    add_oip("oip_uint8_refused", oip([1, C, H, W], datatype="UINT8", binary=base_chw.tobytes(), mode="off"))
    add_oip("oip_wrong_dtype_int64", oip([1, C, H, W], [0] * (C * H * W), datatype="INT64"))
    add_oip("oip_wrong_dtype_bytes", oip([1], ["abc"], datatype="BYTES"))
    add_oip("oip_wrong_shape", oip([1, 2, H, W], [0.0] * (2 * H * W)))
    add_oip("oip_rank3", oip([C, H, W], [0.0] * (C * H * W)))
    add_oip("oip_zero_batch", oip([0, C, H, W], []))
    add_oip("oip_negative_dim", oip([-1, C, H, W], [0.0] * (C * H * W)))
    add_oip("oip_overflow_shape", oip([2**40, 2**40, 2**40, 1], [0.0]))
    add_oip("oip_count_mismatch", oip([1, C, H, W], [0.0] * 10))
    nan = good.copy()
    nan[0, 0, 0] = np.nan
    add_oip("oip_binary_nan", oip([1, C, H, W], binary=nan.tobytes()))
    add_oip("oip_binary_inf", oip([1, C, H, W], binary=np.full_like(good, np.inf).tobytes()))
    add_oip("oip_out_of_range", oip([1, C, H, W], binary=np.full_like(good, 2.0).tobytes()))
    add_oip("oip_fp64_refused", oip([1, C, H, W], binary=good.astype("<f8").tobytes(), datatype="FP64", mode="off"))
    add_oip("oip_fp16_refused", oip([1, C, H, W], binary=good.astype("<f2").tobytes(), datatype="FP16"))
    body, hdr = oip([1, C, H, W], binary=good.tobytes())
    add_oip("oip_binary_size_mismatch", (body[:-4], hdr))
    add_oip("oip_header_length_too_big", (body, {**hdr, "Inference-Header-Content-Length": str(len(body) + 10)}))
    add_oip("oip_header_length_not_int", (body, {**hdr, "Inference-Header-Content-Length": "12abc"}))
    add_oip("oip_wrong_input_name", oip([1, C, H, W], good.reshape(-1).tolist(), name="nope"))
    add_oip("oip_strings_in_data", oip([1, C, H, W], ["x"] * (C * H * W)))
    add_oip("oip_numeric_strings_in_data", oip([1, C, H, W], ["0.5"] * (C * H * W)))
    add_oip("oip_booleans_in_data", oip([1, C, H, W], [False] * (C * H * W)))
    add_oip("oip_no_inputs", (b'{"inputs": []}', {"Content-Type": "application/json"}))
    add_oip("oip_not_json", (b"\x00\x01\x02", {"Content-Type": "application/json"}))
    add_oip("oip_too_many_images", oip([max_images + 1, C, H, W], binary=b"\x00" * ((max_images + 1) * C * H * W * 4)),
            frozenset({413}))  # fmt: skip
    # the image count is read from the shape, before the data: no data at all is still a 413
    add_oip("oip_too_many_images_no_data", oip([max_images + 1, C, H, W], []), frozenset({413}))
    # issue 13: each of these answered 500
    add_oip("oip_bool_in_shape", oip([True, C, H, W], good.reshape(-1).tolist()))
    add_oip("oip_float_in_shape", oip([1.0, C, H, W], good.reshape(-1).tolist()))
    add_oip("oip_overflow_product_empty_data", oip([2**32, 2**32, 1, 1], []))
    add_oip("oip_overflow_product_binary_0", oip([2**32, 2**32, 1, 1], binary=b""))
    add_oip("oip_header_length_superscript_digit", (body, {**hdr, "Inference-Header-Content-Length": "\u00b2"}))
    add_oip("oip_header_length_superscripts", (body, {**hdr, "Inference-Header-Content-Length": "\u00b9\u00b2"}))
    flags = {"Content-Type": "application/json"}
    for field_name, value in (("binary_data_output", "false"), ("binary_data_output", 1), ("mode", ["off"])):
        doc = {"inputs": [{"name": OIP_INPUT, "datatype": "FP32", "shape": [1, C, H, W],
                           "data": good.reshape(-1).tolist()}], "parameters": {field_name: value}}  # fmt: skip
        add_oip(f"oip_param_{field_name}_{type(value).__name__}", (js(doc), flags))
    doc = {"inputs": [{"name": OIP_INPUT, "datatype": "FP32", "shape": [1, C, H, W], "data": [0.5] * (C * H * W)}],
           "outputs": [{"name": "label", "parameters": {"binary_data": "false"}}]}  # fmt: skip
    add_oip("oip_output_binary_data_str", (js(doc), flags))
    # outside review: wrongly typed members and encodings of the header (each a 400 naming the member)
    inp = {"name": OIP_INPUT, "datatype": "FP32", "shape": [1, C, H, W], "data": good.reshape(-1).tolist()}
    for case, hostile in (
        ("outputs_object", {"inputs": [inp], "outputs": {"name": "label"}}),
        ("parameters_list", {"inputs": [inp], "parameters": []}),
        ("input_parameters_list", {"inputs": [{**inp, "parameters": []}]}),
        ("id_number", {"id": 5, "inputs": [inp]}),
        ("data_objects", {"inputs": [{**inp, "data": [{"a": 1}] * (C * H * W)}]}),
        ("binary_data_size_bool", {"inputs": [{**inp, "parameters": {"binary_data_size": True}}]}),
        ("datatype_lowercase", {"inputs": [{**inp, "datatype": "fp32"}]}),
        ("two_inputs", {"inputs": [inp, inp]}),
    ):
        add_oip(f"oip_{case}", (js(hostile), flags))
    add_oip("oip_utf16_header", (json.dumps({"inputs": [inp]}).encode("utf-16"), flags))
    add_oip("oip_bom_header", (b"\xef\xbb\xbf" + js({"inputs": [inp]}), flags))
    add_oip("oip_null_header", (b"null", flags))
    # issue 13 items 5-12: forged client identities are ignored (no trusted proxy), the repository extension's
    # bodies are refused before they are parsed on a server without an admin key (403), never a 5xx
    spoof = {"X-Forwarded-For": "203.0.113.9, 10.0.0.1", "X-Real-IP": "198.51.100.1", "Forwarded": "for=1.2.3.4"}
    add("predict_forged_forwarded_for", png, ok, headers=spoof)
    add("predict_garbage_forwarded_for", png, ok, headers={"X-Forwarded-For": "not-an-ip, , ::::, 999.1.1.1"})
    forged_body, forged_headers = oip([1, C, H, W], good.reshape(-1).tolist())
    add_oip("oip_forged_forwarded_for", (forged_body, {**forged_headers, **spoof}), ok)
    guess = {"Authorization": "Bearer guessed-admin-key"}
    repository = (
        ("index_not_json", "index", b"{not json"),
        ("index_ready_str", "index", b'{"ready": "yes"}'),
        ("load_empty_no_ctype", "models/rgb/load", b"{}"),
        ("load_triton_config", "models/rgb/load", b'{"parameters": {"config": "{\\"backend\\": \\"python\\"}"}}'),
        ("load_other_model", "models/other/load", b""),
        ("unload_list_body", "models/rgb/unload", b"[]"),
    )
    for name, route, raw in repository:
        add(f"repository_{name}", raw, frozenset({403}), ctype=None, path=f"/v2/repository/{route}", headers=guess)
    return cases


def _interlaced_png(hwc: np.ndarray) -> bytes:
    """Adam7-interlaced RGB PNG written by hand (Pillow does not write interlaced PNGs)."""
    h, w, _ = hwc.shape
    passes = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))
    raw = b""
    for x0, y0, dx, dy in passes:
        sub = hwc[y0::dy, x0::dx]
        if sub.size == 0:
            continue
        raw += b"".join(b"\x00" + row.tobytes() for row in sub)
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 1)
    return (
        b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(raw))
        + png_chunk(b"IEND", b"")
    )  # fmt: skip

"""Real image files of every kind a catalog holds, good and bad, for the decoding tests."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def picture(size=(40, 30), mode="RGB") -> Image.Image:
    rng = np.random.default_rng(size[0] * 31 + size[1])
    pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB").convert(mode)


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bomb_png(side: int = 100_000) -> bytes:
    """A 100 kB-free PNG whose header declares side x side pixels (10^10 at the default)."""
    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", zlib.compress(b"\0" * 1024)) + png_chunk(b"IEND", b"")


def exif_rotated() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees: 40x30 stored, 30x40 shown
    return encode(picture((40, 30)), "JPEG", exif=exif)


def corrupt_exif() -> bytes:
    good = encode(picture((30, 20)), "JPEG")
    payload = b"Exif\0\0MM\x00\x2a\x00\x00\x00\x08\xff\xff" + b"\x00" * 20
    return good[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + good[2:]


def palette_png(transparent: bool) -> bytes:
    image = picture((24, 24)).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    return encode(image, "PNG", **({"transparency": 0} if transparent else {}))


# name -> (bytes, expected): "ok" (decoded, width x height after EXIF) or a reason's start
CORPUS: dict[str, tuple[bytes, str]] = {
    "truncated.jpg": (encode(picture((64, 48)), "JPEG", quality=95)[:600], "cannot decode"),
    "zero.jpg": (b"", "empty file"),
    "text.jpg": (b"this is not an image, it is a text file\n" * 4, "not an image"),
    "bomb.png": (bomb_png(), "decompression bomb"),
    "bomb-below-pil-limit.png": (bomb_png(10_000), "cannot decode: Image size"),  # 10^8 pixels: over the limit, under PIL's 2x
    "cmyk.jpg": (encode(picture((30, 20), "CMYK"), "JPEG"), "ok 30x20"),
    "gray16.png": (encode(Image.fromarray((np.arange(600).reshape(20, 30) * 100).astype(np.uint16)), "PNG"), "ok 30x20"),
    "rgba.png": (encode(picture((30, 20), "RGBA"), "PNG"), "ok 30x20"),
    "palette.png": (palette_png(False), "ok 24x24"),
    "palette-transparent.png": (palette_png(True), "ok 24x24"),
    "one-pixel.png": (encode(Image.new("RGB", (1, 1), (200, 10, 10)), "PNG"), "ok 1x1"),
    "exif-rotated.jpg": (exif_rotated(), "ok 30x40"),
    "corrupt-exif.jpg": (corrupt_exif(), "ok 30x20"),
    "grayscale.jpg": (encode(picture((30, 20), "L"), "JPEG"), "ok 30x20"),
    "png-named.jpg": (encode(picture((30, 20)), "PNG"), "ok 30x20"),
    "float.tiff": (encode(Image.fromarray(np.linspace(0, 1, 600, dtype=np.float32).reshape(20, 30)), "TIFF"), "ok 30x20"),
    "animated.gif": (encode(Image.new("P", (30, 20), 1), "GIF", save_all=True, append_images=[Image.new("P", (30, 20), 2)]), "ok 30x20"),
    "fine.webp": (encode(picture((30, 20)), "WEBP"), "ok 30x20"),
}

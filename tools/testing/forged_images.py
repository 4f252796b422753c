"""Forged image files for the robustness tests: unreadable, hostile and unusual images, with
the error (or the size the model gets) each one must produce."""

from __future__ import annotations

import io
import struct
import zlib
from typing import Any, Callable

import numpy as np
from PIL import Image


def encode(img: Image.Image, fmt: str, **params: Any) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, fmt, **params)
    return buffer.getvalue()


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(width: int, height: int) -> bytes:
    """A valid 1-bit black PNG of width×height: tiny on disk, width·height pixels decoded."""
    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    compressor = zlib.compressobj(9)
    data = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", data)
            + png_chunk(b"IEND", b""))


def animation(fmt: str) -> bytes:
    frames = [Image.new("RGB", (40, 30), colour) for colour in ((220, 20, 20), (20, 20, 220))]
    return encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)


def exif_rotated_jpeg() -> bytes:
    """Stored 40 wide × 20 high, with EXIF orientation 6 (rotate 90°): shown 20 × 40."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(noise(40, 20), "JPEG", exif=exif)


BAD_IMAGES: dict[str, tuple[Callable[[], bytes], str]] = {
    # file name: (its bytes, the substance of the error)
    "text.txt": (lambda: b"What is in this picture? Just some text.\n",
                 "could not be read as an image: unrecognised file format"),
    "empty.png": (lambda: b"", "could not be read as an image: the data is empty"),
    "document.pdf": (lambda: b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\n%%EOF\n",
                     "it is a PDF document, not an image"),
    "truncated.png": (lambda: encode(noise(64, 64), "PNG")[:6000], "PNG data is truncated or corrupt"),
    "truncated.jpg": (lambda: encode(noise(64, 64), "JPEG", quality=95)[:2000],
                      "JPEG data is truncated or corrupt"),
    "bomb.png": (lambda: bomb_png(30000, 30000), "too large: 900000000 pixels (900.0 megapixels)"),
}
GOOD_IMAGES: dict[str, tuple[Callable[[], bytes], str]] = {
    # file name: (its bytes, the size the model gets, as the log shows it)
    "one_pixel.png": (lambda: encode(Image.new("RGB", (1, 1), (9, 99, 199)), "PNG"), "1x1"),
    "tall.png": (lambda: encode(noise(1, 4000), "PNG"), "1x4000"),
    "wide.png": (lambda: encode(noise(4000, 1), "PNG"), "4000x1"),
    "animated.gif": (lambda: animation("GIF"), "40x30"),
    "animated.webp": (lambda: animation("WEBP"), "40x30"),
    "cmyk.jpg": (lambda: encode(Image.new("CMYK", (40, 30), (0, 200, 200, 0)), "JPEG"), "40x30"),
    "rgba.png": (lambda: encode(Image.new("RGBA", (40, 30), (255, 0, 0, 100)), "PNG"), "40x30"),
    "grey16.png": (lambda: encode(Image.fromarray(np.full((30, 40), 40000, np.uint16)), "PNG"),
                   "40x30"),
    "palette.png": (lambda: encode(noise(40, 30).convert("P", palette=Image.Palette.ADAPTIVE), "PNG"),
                    "40x30"),
    "rotated.jpg": (exif_rotated_jpeg, "20x40"),
}

"""Safe decoding of user-supplied images into RGB PIL images.

`load_image` turns a path, raw bytes or a binary file object into an RGB image the processor can
use, or raises `ImageInputError` (a ValueError) whose message tells the user which input was
wrong and what to change. The rules (see docs/cog.md, "Images"):

- Only common raster formats are opened (`ACCEPTED_FORMATS`); Pillow's other parsers (EPS, PSD,
  ICO, ...) are never tried.
- Size is checked from the header before any pixel is decoded. Images above `max_pixels`
  (default 50 megapixels) are refused, except JPEGs, which are decoded at 1/2, 1/4 or 1/8 scale
  (libjpeg's DCT scaling, memory bounded) when that brings them under the limit. Pillow's own
  decompression-bomb check (`Image.MAX_IMAGE_PIXELS`, 89.5 MP by default) also applies; its
  warning is turned into the same error instead of passing silently.
- Pixels are fully decoded inside a try: truncated or corrupt files are refused, never returned
  half-decoded. `ImageFile.LOAD_TRUNCATED_IMAGES` must stay False (checked on every call).
- Animations (GIF, WebP, ...) give their first frame; multi-page TIFFs their first page.
- EXIF orientation is applied, so the model sees the image the way people see it.
- Transparency (alpha channel, palette or colour-key transparency) is flattened onto white.
- 16-bit greyscale is scaled to 8 bits (v / 257), not clipped; CMYK, palette, 1-bit, LA, ...
  are converted with Pillow's standard conversions. Embedded ICC profiles are not applied.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageFile, ImageOps

logger = logging.getLogger(__name__)

DEFAULT_MAX_PIXELS = 50_000_000
"""Largest decoded image, in pixels (50 MP: about 150 MB as RGB). The model itself never looks at
more than about 1.3 MP (its largest tiling is 1152x1152), so larger images gain nothing."""

# Pillow format ids we are willing to parse; MPO is how Pillow names many phone JPEGs.
_WANTED_FORMATS = ("JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP", "TIFF", "AVIF")
_JPEG_FORMATS = ("JPEG", "MPO")
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_DRAFT_SCALES = (2, 4, 8)


class ImageInputError(ValueError):
    """A user-supplied image cannot be used; the message says which one and what to change."""


def _available_formats() -> tuple[str, ...]:
    Image.init()
    return tuple(fmt for fmt in _WANTED_FORMATS if fmt in Image.OPEN)


ACCEPTED_FORMATS: tuple[str, ...] = _available_formats()
"""Pillow format ids that `load_image` opens (AVIF only when this Pillow build has it)."""

ACCEPTED_FORMATS_TEXT = ", ".join(
    {"WEBP": "WebP"}.get(fmt, fmt) for fmt in ACCEPTED_FORMATS if fmt != "MPO"
)
"""The accepted formats as users know them (MPO is a kind of JPEG), for error messages."""


def load_image(
    source: str | os.PathLike | bytes | bytearray | memoryview | BinaryIO,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    name: str = "image",
) -> Image.Image:
    """Decode one user image into a fully loaded RGB `PIL.Image.Image`.

    `source` is a file path (str or any `os.PathLike`, e.g. `cog.Path`), raw bytes, or a binary
    file object (read from its start; not closed). `name` names the input in error messages
    (e.g. "image 2"). Raises `ImageInputError` when the input is not a readable image in an
    accepted format, is truncated or corrupt, or is larger than `max_pixels`. The result's
    `info` holds only "source", a short description of the original for logs.
    """
    _require_strict_truncation_checks()
    with _binary_stream(source, name) as stream, _bomb_warnings_as_errors():
        try:
            with _open_header(stream, name) as original:
                _fit_within_limit(original, max_pixels, name)
                _decode_pixels(original, name)
                _check_decoded_size(original, max_pixels, name)
                rgb = _to_rgb(_upright(original, name), name)
                rgb.info = {"source": _describe_original(original)}
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as bomb:
            raise _too_large_error(name, _size_from_pillow_bomb(bomb),
                                   _effective_limit(max_pixels)) from None
    return rgb


def describe_image(img: Image.Image) -> str:
    """One line for logs: size and mode, plus a description of the original from `load_image`."""
    text = f"{img.width}x{img.height} {img.mode}"
    if img.format:
        text += f" {img.format}"
    source = img.info.get("source")
    if source:
        text += f" (from {source})"
    return text


# -- opening -----------------------------------------------------------------------------------


def _require_strict_truncation_checks() -> None:
    """Fail loudly if something in the process told Pillow to accept truncated files."""
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise RuntimeError(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True somewhere in this process; "
            "load_image refuses to run because truncated images would be accepted half-decoded"
        )


@contextlib.contextmanager
def _binary_stream(source: object, name: str) -> Iterator[BinaryIO]:
    """Yield a binary stream over `source`; files opened here are closed afterwards."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        yield io.BytesIO(bytes(source))
    elif isinstance(source, (str, os.PathLike)):
        with _open_path(Path(source), name) as file:
            yield file
    elif hasattr(source, "read"):
        yield source  # type: ignore[misc]
    else:
        kind = type(source).__name__
        raise TypeError(f"{name}: expected a path, bytes or a binary file, got {kind}")


def _open_path(path: Path, name: str) -> BinaryIO:
    try:
        if path.is_dir():
            raise _unreadable_error(name, f"{path} is a directory, not a file")
        return open(path, "rb")
    except FileNotFoundError:
        raise _unreadable_error(name, f"file not found: {path}") from None
    except OSError as error:
        raise _unreadable_error(name, f"cannot open {path}: {error.strerror or error}") from None


@contextlib.contextmanager
def _bomb_warnings_as_errors() -> Iterator[None]:
    """Turn Pillow's DecompressionBombWarning into an exception for the duration.

    `warnings.catch_warnings` swaps process-wide state and is not thread-safe: a concurrent call
    may see the warning printed instead of raised. With `max_pixels` at or below Pillow's
    threshold (the default) the explicit header check refuses such an image anyway.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        yield


def _open_header(stream: BinaryIO, name: str) -> Image.Image:
    """Identify the format and read the header (size, mode) without decoding pixels."""
    try:
        return Image.open(stream, formats=ACCEPTED_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise
    except Image.UnidentifiedImageError:
        raise _unreadable_error(name, _guess_what_it_is(stream)) from None
    except Exception as error:  # Pillow's header parsers raise many exception types
        raise _unreadable_error(name, f"invalid image header ({error})") from None


def _guess_what_it_is(stream: BinaryIO) -> str:
    """A short reason for an unidentified file, naming common non-images."""
    try:
        stream.seek(0)
        head = stream.read(64)
    except Exception:  # a non-seekable stream cannot be re-read
        return "unrecognised file format"
    if not isinstance(head, bytes):
        return "the file object is in text mode; open it in binary mode"
    if not head:
        return "the data is empty"
    if head.startswith(b"%PDF"):
        return "it is a PDF document, not an image"
    if head[4:12] in (b"ftypheic", b"ftypheix", b"ftyphevc", b"ftypheim", b"ftypheis", b"ftypmif1"):
        return "it is a HEIC/HEIF photo, which is not supported; export it as JPEG"
    if b"<svg" in head or head.lstrip().startswith(b"<?xml"):
        return "it is an SVG/XML document, not a raster image"
    return "unrecognised file format"


# -- size limits -------------------------------------------------------------------------------


def _size_from_pillow_bomb(bomb: Exception) -> str:
    """The pixel count Pillow's bomb check reports ("Image size (N pixels) exceeds ...")."""
    found = re.search(r"\((\d+) pixels\)", str(bomb))
    if found is None:
        return "over Pillow's decompression-bomb limit"
    pixels = int(found.group(1))
    return f"{pixels} pixels ({_megapixels(pixels)})"


def _effective_limit(max_pixels: int) -> int:
    """Pillow's own bomb threshold still applies when the caller raises `max_pixels` above it."""
    pillow = Image.MAX_IMAGE_PIXELS
    return min(max_pixels, pillow) if pillow else max_pixels


def _fit_within_limit(im: Image.Image, max_pixels: int, name: str) -> None:
    """Refuse an over-large image from its header, or set up a reduced-scale JPEG decode."""
    width, height = im.size
    if width * height <= max_pixels:
        return
    scale = _jpeg_draft_scale(width, height, max_pixels) if im.format in _JPEG_FORMATS else None
    if scale is None:
        raise _too_large_error(name, f"{width}x{height} pixels ({_megapixels(width * height)})",
                               max_pixels)
    im.draft(im.mode, (max(1, width // scale), max(1, height // scale)))
    logger.info("%s: %dx%d JPEG decoded at 1/%d scale as %dx%d", name, width, height, scale,
                *im.size)


def _jpeg_draft_scale(width: int, height: int, max_pixels: int) -> int | None:
    """Smallest DCT scale-down (2, 4, 8) whose output fits in `max_pixels`, else None."""
    for scale in _DRAFT_SCALES:
        if -(-width // scale) * -(-height // scale) <= max_pixels:
            return scale
    return None


def _check_decoded_size(im: Image.Image, max_pixels: int, name: str) -> None:
    """Re-check after decoding: a GIF frame may extend the canvas, or a draft may not apply."""
    width, height = im.size
    if width * height > max_pixels:
        raise _too_large_error(name, f"{width}x{height} pixels ({_megapixels(width * height)})",
                               max_pixels)


# -- decoding ----------------------------------------------------------------------------------


def _decode_pixels(im: Image.Image, name: str) -> None:
    """Decode every pixel of the first frame now, so truncation is an error here and not later."""
    try:
        im.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise
    except Exception as error:  # decoders raise OSError, SyntaxError, ValueError, EOFError, ...
        raise _unreadable_error(
            name, f"the {im.format or 'image'} data is truncated or corrupt ({error}); "
            "re-save or re-upload the file"
        ) from None


def _upright(im: Image.Image, name: str) -> Image.Image:
    """Apply the EXIF orientation tag; a broken EXIF block is logged and ignored."""
    try:
        return ImageOps.exif_transpose(im)
    except Exception as error:
        logger.warning("%s: ignoring unreadable EXIF orientation (%s)", name, error)
        return im


def _to_rgb(im: Image.Image, name: str) -> Image.Image:
    """Convert any decoded mode to a new RGB image (16-bit scaled, transparency on white)."""
    if im.mode in _SIXTEEN_BIT_MODES:
        im = _sixteen_bit_to_grey(im)
    try:
        if im.has_transparency_data:
            return _flatten_on_white(im)
        return im.convert("RGB")
    except Exception as error:
        raise _unreadable_error(
            name, f"its colour mode {im.mode} cannot be converted to RGB ({error}); "
            "save it as an 8-bit RGB PNG or JPEG"
        ) from None


def _sixteen_bit_to_grey(im: Image.Image) -> Image.Image:
    """Map 16-bit greyscale 0..65535 to 8-bit 0..255 by rounding v / 257 (65535 / 255 = 257)."""
    values = np.asarray(im).astype(np.uint32)  # [H, W]
    np.clip(values, 0, 65535, out=values)
    grey = ((values * 255 + 32767) // 65535).astype(np.uint8)
    return Image.fromarray(grey, mode="L")


def _flatten_on_white(im: Image.Image) -> Image.Image:
    """Composite an image with any kind of transparency onto an opaque white background."""
    rgba = im.convert("RGBA")
    flat = Image.new("RGB", rgba.size, (255, 255, 255))
    flat.paste(rgba, mask=rgba)  # alpha-blends: rgb * a + white * (1 - a)
    return flat


def _describe_original(im: Image.Image) -> str:
    text = f"{im.format} {im.width}x{im.height} {im.mode}"
    try:
        animated = bool(getattr(im, "is_animated", False))
    except Exception:
        animated = False
    return text + (", first frame of an animation" if animated else "")


# -- messages ----------------------------------------------------------------------------------


def _megapixels(pixels: int) -> str:
    return f"{pixels / 1e6:.1f} megapixels"


def _unreadable_error(name: str, reason: str) -> ImageInputError:
    return ImageInputError(
        f"{name} could not be read as an image: {reason}. "
        f"Accepted formats: {ACCEPTED_FORMATS_TEXT}."
    )


def _too_large_error(name: str, size: str, limit: int) -> ImageInputError:
    return ImageInputError(
        f"{name} is too large: {size}; the limit is {_megapixels(limit)} "
        f"({limit} pixels). Downscale it and try again."
    )

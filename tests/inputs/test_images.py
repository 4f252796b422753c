"""Tests for deepseek_vl2.inputs.images: decoding untrusted user images into RGB.

Every test image is generated here with Pillow/numpy (or written byte by byte for the bombs);
expected pixels come from the definitions (palette entries, alpha blending on white, v / 257 for
16-bit, the EXIF orientation spec), not from running the code under test.
"""

from __future__ import annotations

import io
import struct
import subprocess
import sys
import textwrap
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from tools.parity.reference_data import ENV_VAR, reference_dir

from deepseek_vl2.inputs.images import (
    DEFAULT_MAX_PIXELS,
    ImageInputError,
    describe_image,
    load_image,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
WHITE = (255, 255, 255)


# -- helpers -------------------------------------------------------------------------------------


def encode(img: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, fmt, **params)
    return buffer.getvalue()


def random_rgb(width: int, height: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def pixels(img: Image.Image) -> np.ndarray:
    return np.asarray(img).astype(int)


def quadrants(width: int, height: int, colours: list[tuple[int, int, int]]) -> Image.Image:
    """An RGB image with quadrants coloured colours[0..3]: TL, TR, BL, BR."""
    array = np.zeros((height, width, 3), dtype=np.uint8)
    h2, w2 = height // 2, width // 2
    array[:h2, :w2], array[:h2, w2:], array[h2:, :w2], array[h2:, w2:] = colours
    return Image.fromarray(array)


def quadrant_centres(img: Image.Image) -> list[tuple[int, ...]]:
    """Pixel values at the centres of the four quadrants (TL, TR, BL, BR)."""
    w, h = img.size
    left, right, top, bottom = w // 4, 3 * w // 4, h // 4, 3 * h // 4
    points = [(left, top), (right, top), (left, bottom), (right, bottom)]
    return [img.getpixel(p) for p in points]


def assert_close(actual, expected, tolerance: int) -> None:
    difference = np.asarray(actual, dtype=int) - np.asarray(expected, dtype=int)
    assert np.abs(difference).max() <= tolerance, (actual, expected)


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def black_bilevel_png(width: int, height: int) -> bytes:
    """A valid 1-bit greyscale PNG of all-zero rows: tiny on disk, width*height pixels decoded."""
    row = bytes(1 + (width + 7) // 8)  # filter byte + packed bits
    compressor = zlib.compressobj(9)
    rows_per_block = 256
    parts = [compressor.compress(row * rows_per_block) for _ in range(height // rows_per_block)]
    parts += [compressor.compress(row * (height % rows_per_block)), compressor.flush()]
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header)
            + png_chunk(b"IDAT", b"".join(parts)) + png_chunk(b"IEND", b""))


@pytest.fixture
def forbid_pixel_decoding(monkeypatch):
    """Fail the test if any image's pixels get decoded (ImageFile.load is where that happens)."""
    calls = []

    def spy(self):
        calls.append(self.size)
        raise AssertionError(f"pixels of a {self.size} image were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy)
    return calls


# -- ordinary inputs -----------------------------------------------------------------------------


@pytest.mark.parametrize("fmt, params", [
    ("PNG", {}), ("BMP", {}), ("TIFF", {}), ("WEBP", {"lossless": True}),
])
def test_lossless_rgb_formats_decode_exactly(fmt, params):
    array = random_rgb(37, 23)
    img = load_image(encode(Image.fromarray(array), fmt, **params))
    assert img.mode == "RGB" and img.size == (37, 23)
    assert np.array_equal(np.asarray(img), array)


@pytest.mark.parametrize("fmt", ["JPEG", "AVIF"])
def test_lossy_rgb_formats_decode_close(fmt):
    if fmt not in Image.registered_extensions().values():
        pytest.skip(f"this Pillow build cannot write {fmt}")
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (240, 240, 240)]
    img = load_image(encode(quadrants(64, 48, colours), fmt, quality=95))
    assert img.mode == "RGB" and img.size == (64, 48)
    assert_close(quadrant_centres(img), colours, tolerance=12)


def test_reference_inputs_decode_like_the_official_pipeline():
    """The official implementation does Image.open(path).convert("RGB"); RGB files must match it."""
    inputs = sorted((reference_dir() / "inputs").glob("*.png"))
    if not inputs:
        pytest.skip(f"no reference inputs in {reference_dir() / 'inputs'}; set {ENV_VAR}")
    for path in inputs:
        with Image.open(path) as official:
            expected = np.asarray(official.convert("RGB"))
        assert np.array_equal(np.asarray(load_image(path)), expected), path.name


@pytest.mark.parametrize("size", [(1, 1), (1, 4000), (4000, 1)])
@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_tiny_and_extreme_aspect_images_are_accepted(size, fmt):
    colour = (10, 120, 250)
    params = {"quality": 95} if fmt == "JPEG" else {}
    img = load_image(encode(Image.new("RGB", size, colour), fmt, **params))
    assert img.size == size and img.mode == "RGB"
    assert_close(img.getpixel((0, 0)), colour, tolerance=0 if fmt == "PNG" else 8)


# -- kinds of source -----------------------------------------------------------------------------


def test_paths_bytes_and_file_objects_give_the_same_image(tmp_path):
    array = random_rgb(20, 10)
    data = encode(Image.fromarray(array), "PNG")
    path = tmp_path / "in.png"
    path.write_bytes(data)
    at_end = io.BytesIO(data)
    at_end.seek(0, io.SEEK_END)  # file objects are read from their start
    sources = [str(path), path, data, bytearray(data), memoryview(data), at_end]
    for source in sources:
        assert np.array_equal(np.asarray(load_image(source)), array), type(source)
    assert not at_end.closed  # a caller's stream is left open


class ReadOnlyStream:
    """A file-like object without seek, like a socket or pipe."""

    def __init__(self, data: bytes):
        self._data = io.BytesIO(data)

    def read(self, size: int = -1) -> bytes:
        return self._data.read(size)


def test_non_seekable_streams_are_read():
    array = random_rgb(5, 4)
    img = load_image(ReadOnlyStream(encode(Image.fromarray(array), "PNG")))
    assert np.array_equal(np.asarray(img), array)
    with pytest.raises(ImageInputError, match="could not be read as an image: unrecognised file"):
        load_image(ReadOnlyStream(b"just some text"))


def test_text_mode_file_is_refused(tmp_path):
    path = tmp_path / "in.png"
    path.write_bytes(encode(Image.new("RGB", (3, 2)), "PNG"))
    with open(path, encoding="latin-1") as text_file:
        with pytest.raises(ImageInputError, match="text mode"):
            load_image(text_file)


def test_cog_path_is_accepted(tmp_path):
    cog = pytest.importorskip("cog")
    path = tmp_path / "in.png"
    path.write_bytes(encode(Image.new("RGB", (3, 2), (1, 2, 3)), "PNG"))
    img = load_image(cog.Path(path))
    assert img.getpixel((2, 1)) == (1, 2, 3)


def test_result_is_detached_from_the_file(tmp_path):
    path = tmp_path / "in.gif"
    frames = [Image.new("RGB", (8, 8), c) for c in [(255, 0, 0), (0, 255, 0)]]
    frames[0].save(path, save_all=True, append_images=frames[1:])
    img = load_image(path)
    path.unlink()
    assert img.copy().getpixel((0, 0)) == (255, 0, 0)
    assert type(img) is Image.Image  # a plain image, not a lazily-read ImageFile


def test_unsupported_source_type_is_a_type_error():
    with pytest.raises(TypeError):
        load_image(12345)  # type: ignore[arg-type]


# -- not an image --------------------------------------------------------------------------------


def _pdf_bytes() -> bytes:
    return b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n"


@pytest.mark.parametrize("data, reason", [
    (b"", "empty"),
    (b"hello, this is plain text and not a picture\n" * 3, "unrecognised"),
    (_pdf_bytes(), "PDF"),
    (b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(64), "HEIC"),
    (b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg"/>', "SVG"),
    (encode(Image.new("RGB", (16, 16)), "ICO"), "unrecognised"),  # Pillow reads it; we do not
    (encode(Image.new("RGB", (16, 16)), "PPM"), "unrecognised"),
], ids=["empty", "text", "pdf", "heic", "svg", "ico", "ppm"])
def test_non_images_are_refused_with_accepted_formats(data, reason):
    with pytest.raises(ImageInputError) as error:
        load_image(data, name="image 2")
    message = str(error.value)
    assert message.startswith("image 2 could not be read as an image")
    assert reason in message
    assert "Accepted formats: JPEG, PNG, WebP" in message


def test_missing_path_and_directory_are_refused(tmp_path):
    with pytest.raises(ImageInputError, match=r"image 1 could not be read as an image: file not"):
        load_image(tmp_path / "nope.png", name="image 1")
    with pytest.raises(ImageInputError, match=r"could not be read as an image: .* is a directory"):
        load_image(str(tmp_path), name="image 1")


def test_image_input_error_is_a_value_error():
    assert issubclass(ImageInputError, ValueError)


# -- truncated and corrupt files ---------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "WEBP"])
@pytest.mark.parametrize("keep", [0.3, 0.6, 0.95])
def test_truncated_files_are_refused(fmt, keep):
    data = encode(Image.fromarray(random_rgb(120, 90)), fmt)
    with pytest.raises(ImageInputError) as error:
        load_image(data[: int(len(data) * keep)], name="image 3")
    assert str(error.value).startswith("image 3 could not be read as an image")


def test_truncated_png_message_names_the_cause():
    data = encode(Image.fromarray(random_rgb(120, 90)), "PNG")
    with pytest.raises(ImageInputError, match=r"PNG data is truncated or corrupt"):
        load_image(data[: len(data) // 2])


def test_corrupt_png_checksum_is_refused():
    data = bytearray(encode(Image.fromarray(random_rgb(64, 64)), "PNG"))
    idat = data.index(b"IDAT")
    data[idat + 40] ^= 0xFF  # flip bits inside the compressed pixels: CRC no longer matches
    with pytest.raises(ImageInputError, match="truncated or corrupt"):
        load_image(bytes(data))


def test_refuses_to_run_when_truncated_loading_is_enabled(monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    data = encode(Image.fromarray(random_rgb(120, 90)), "JPEG")
    with pytest.raises(RuntimeError, match="LOAD_TRUNCATED_IMAGES"):
        load_image(data[: len(data) // 2])


# -- size limits and decompression bombs --------------------------------------------------------


def test_bomb_below_pillows_threshold_is_refused_from_the_header(forbid_pixel_decoding):
    data = black_bilevel_png(9400, 9400)  # 88.4 MP: under Pillow's 89.5 MP warning, over our 50 MP
    assert len(data) < 200_000
    with pytest.raises(ImageInputError) as error:
        load_image(data, name="image 2")
    message = str(error.value)
    assert message.startswith("image 2 is too large: 9400x9400 pixels (88.4 megapixels)")
    assert f"the limit is 50.0 megapixels ({DEFAULT_MAX_PIXELS} pixels)" in message
    assert forbid_pixel_decoding == []


def test_huge_bomb_is_refused_by_pillows_check_with_our_message(forbid_pixel_decoding):
    data = black_bilevel_png(30000, 30000)  # 900 MP, ~110 kB
    assert len(data) < 300_000
    with pytest.raises(ImageInputError) as error:
        load_image(data, name="image 1")
    message = str(error.value)
    assert message.startswith("image 1 is too large: 900000000 pixels (900.0 megapixels)")
    assert "the limit is 50.0 megapixels" in message
    assert forbid_pixel_decoding == []


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_bomb_does_not_allocate_its_decoded_size(tmp_path):
    """In a fresh process, refusing an 88 MP bomb must not raise peak memory by its 88+ MB."""
    bomb, small = tmp_path / "bomb.png", tmp_path / "small.png"
    bomb.write_bytes(black_bilevel_png(9400, 9400))
    small.write_bytes(black_bilevel_png(8, 8))
    script = textwrap.dedent("""
        import sys
        from deepseek_vl2.inputs.images import ImageInputError, load_image

        def peak_rss_kib():  # this process's high-water mark; ru_maxrss would include the parent's
            with open("/proc/self/status") as status:
                return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))

        load_image(sys.argv[2])  # warm up lazily imported plugins
        before = peak_rss_kib()
        try:
            load_image(sys.argv[1])
        except ImageInputError:
            pass
        else:
            sys.exit("bomb accepted")
        print(peak_rss_kib() - before)
    """)
    done = subprocess.run([sys.executable, "-c", script, str(bomb), str(small)], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    growth_kib = int(done.stdout.strip())
    assert growth_kib < 20_000, f"peak RSS grew by {growth_kib} KiB"


def test_pillow_bomb_warning_becomes_an_error_not_a_warning(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # warn above 1000 px, error above 2000 px
    data = encode(Image.new("RGB", (40, 40)), "PNG")  # 1600 px: Pillow would only warn
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ImageInputError) as error:
            load_image(data, max_pixels=10**9)
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]
    assert "1600 pixels" in str(error.value)
    assert "the limit is 0.0 megapixels (1000 pixels)" in str(error.value)
    with pytest.raises(ImageInputError, match="10000 pixels"):
        load_image(encode(Image.new("RGB", (100, 100)), "PNG"), max_pixels=10**9)


def test_max_pixels_is_respected():
    data = encode(Image.new("RGB", (300, 200), (9, 9, 9)), "PNG")
    limit = r"the limit is 0.1 megapixels \(50000 pixels\)"
    with pytest.raises(ImageInputError, match=r"300x200 pixels .*" + limit):
        load_image(data, max_pixels=50_000)
    assert load_image(data, max_pixels=60_000).size == (300, 200)


def test_oversized_jpeg_is_decoded_at_reduced_scale():
    colours = [(220, 20, 20), (20, 220, 20), (20, 20, 220), (230, 230, 230)]
    data = encode(quadrants(400, 300, colours), "JPEG", quality=95)
    half = load_image(data, max_pixels=50_000)  # 120000 px > limit; 1/2 scale = 30000 px fits
    assert half.size == (200, 150)
    assert_close(quadrant_centres(half), colours, tolerance=12)
    assert load_image(data, max_pixels=2_000).size == (50, 38)  # 1/8 scale, rounded up
    with pytest.raises(ImageInputError, match="400x300 pixels"):
        load_image(data, max_pixels=1_000)  # even 1/8 scale (1900 px) is too large


# -- animations ----------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt, params, tolerance", [
    ("GIF", {"duration": 100, "loop": 0}, 0),
    ("WEBP", {"duration": 100, "loop": 0, "lossless": True}, 0),
    ("AVIF", {"duration": 100, "quality": 95}, 12),
    ("TIFF", {}, 0),  # multi-page: first page
])
def test_animations_give_their_first_frame(fmt, params, tolerance):
    if fmt not in Image.registered_extensions().values():
        pytest.skip(f"this Pillow build cannot write {fmt}")
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    frames = [Image.new("RGB", (24, 16), c) for c in colours]
    data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], **params)
    with Image.open(io.BytesIO(data)) as check:
        assert check.n_frames == 3
    img = load_image(data)
    assert img.size == (24, 16)
    assert_close(np.asarray(img).reshape(-1, 3).min(0), colours[0], tolerance)
    assert_close(np.asarray(img).reshape(-1, 3).max(0), colours[0], tolerance)
    assert "first frame of an animation" in describe_image(img)


# -- colour modes --------------------------------------------------------------------------------


def test_cmyk_jpeg_is_converted_to_rgb():
    cmyk_quadrants = [(255, 0, 0, 0), (0, 255, 0, 0), (0, 0, 255, 0), (0, 0, 0, 255)]
    # cyan, magenta, yellow, black
    rgb_expected = [(0, 255, 255), (255, 0, 255), (255, 255, 0), (0, 0, 0)]
    array = np.zeros((32, 32, 4), dtype=np.uint8)
    array[:16, :16], array[:16, 16:], array[16:, :16], array[16:, 16:] = cmyk_quadrants
    data = encode(Image.fromarray(array, mode="CMYK"), "JPEG", quality=95)
    with Image.open(io.BytesIO(data)) as check:
        assert check.mode == "CMYK"
    img = load_image(data)
    assert img.mode == "RGB"
    assert_close(quadrant_centres(img), rgb_expected, tolerance=12)


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_sixteen_bit_greyscale_is_scaled_not_clipped(fmt):
    values = np.array([[0, 257, 1000, 32896, 40000, 65535]], dtype=np.uint16)
    data = encode(Image.fromarray(values), fmt)
    with Image.open(io.BytesIO(data)) as check:
        assert check.mode in ("I;16", "I;16B", "I;16L", "I")
    img = load_image(data)
    expected = np.rint(values / 257.0).astype(int)  # [0, 1, 4, 128, 156, 255]
    assert np.array_equal(pixels(img)[..., 0], expected)
    assert np.array_equal(pixels(img)[..., 1], expected)
    assert np.array_equal(pixels(img)[..., 2], expected)


def test_greyscale_8_bit_and_bilevel():
    grey = np.array([[0, 77, 255]], dtype=np.uint8)
    img = load_image(encode(Image.fromarray(grey), "PNG"))
    assert np.array_equal(pixels(img)[0, :, 1], grey[0])
    bits = np.array([[True, False, True, False]])
    img = load_image(encode(Image.fromarray(bits), "PNG"))
    assert [img.getpixel((x, 0)) for x in range(4)] == [WHITE, (0, 0, 0), WHITE, (0, 0, 0)]


PALETTE = [(255, 0, 0), (0, 128, 0), (0, 0, 255), (10, 20, 30)]


def _palette_image() -> Image.Image:
    """4x1 palette image whose pixels are palette entries 0, 1, 2, 3 (= PALETTE)."""
    img = Image.new("P", (4, 1))
    img.putpalette([c for colour in PALETTE for c in colour] + [0] * (256 * 3 - 12))
    img.putdata([0, 1, 2, 3])
    return img


@pytest.mark.parametrize("fmt", ["PNG", "GIF", "BMP"])
def test_palette_without_transparency_uses_palette_colours(fmt):
    img = load_image(encode(_palette_image(), fmt))
    assert [img.getpixel((x, 0)) for x in range(4)] == PALETTE


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_palette_transparent_index_becomes_white(fmt):
    img = load_image(encode(_palette_image(), fmt, transparency=1))
    assert [img.getpixel((x, 0)) for x in range(4)] == [PALETTE[0], WHITE, PALETTE[2], PALETTE[3]]


def test_palette_with_partial_alpha_blends_onto_white():
    source = _palette_image()
    alphas = bytes([255, 0, 128, 64])  # tRNS alpha per palette entry
    img = load_image(encode(source, "PNG", transparency=alphas))
    for x, (colour, alpha) in enumerate(zip(PALETTE, alphas)):
        expected = [round((c * alpha + 255 * (255 - alpha)) / 255) for c in colour]
        assert_close(img.getpixel((x, 0)), expected, tolerance=1)


def test_rgba_is_flattened_onto_white_not_black():
    rgba = [[0, 0, 0, 0], [0, 0, 0, 255], [200, 100, 0, 128], [10, 200, 30, 255]]
    array = np.array([rgba], dtype=np.uint8)
    img = load_image(encode(Image.fromarray(array, mode="RGBA"), "PNG"))
    assert img.mode == "RGB"
    for x, (*colour, alpha) in enumerate(array[0].tolist()):
        expected = [round((c * alpha + 255 * (255 - alpha)) / 255) for c in colour]
        assert_close(img.getpixel((x, 0)), expected, tolerance=1)
    assert img.getpixel((0, 0)) == WHITE


def test_la_is_flattened_onto_white():
    array = np.array([[[0, 0], [0, 255], [0, 128], [200, 255]]], dtype=np.uint8)
    img = load_image(encode(Image.fromarray(array, mode="LA"), "PNG"))
    for x, (grey, alpha) in enumerate(array[0].tolist()):
        expected = round((grey * alpha + 255 * (255 - alpha)) / 255)
        assert_close(img.getpixel((x, 0)), [expected] * 3, tolerance=1)


@pytest.mark.parametrize("mode, key", [("RGB", (0, 255, 0)), ("L", 50)])
def test_colour_key_transparency_is_flattened_onto_white(mode, key):
    source = Image.new(mode, (2, 1), key)
    source.putpixel((1, 0), (7, 8, 9) if mode == "RGB" else 9)
    img = load_image(encode(source, "PNG", transparency=key))
    assert img.getpixel((0, 0)) == WHITE
    assert img.getpixel((1, 0)) == ((7, 8, 9) if mode == "RGB" else (9, 9, 9))


def test_transparent_webp_is_flattened_onto_white():
    array = np.array([[[0, 0, 0, 0], [30, 60, 90, 255]]], dtype=np.uint8)
    img = load_image(encode(Image.fromarray(array, mode="RGBA"), "WEBP", lossless=True))
    assert img.getpixel((0, 0)) == WHITE and img.getpixel((1, 0)) == (30, 60, 90)


def test_result_carries_no_transparency_metadata():
    img = load_image(encode(_palette_image(), "PNG", transparency=1))
    assert "transparency" not in img.info
    assert img.convert("RGBA").getpixel((1, 0)) == (255, 255, 255, 255)


# -- EXIF orientation ---------------------------------------------------------------------------

RED, GREEN, BLUE, GREY = (230, 20, 20), (20, 230, 20), (20, 20, 230), (128, 128, 128)

# Stored image: 80 wide x 48 high, quadrants TL red, TR green, BL blue, BR grey. Expected display
# per the EXIF spec: 2 mirror, 3 rotate 180, 4 flip vertically, 6 rotate 90 clockwise,
# 8 rotate 90 anticlockwise, 5 transpose (mirror along the main diagonal), 7 transverse.
ORIENTATIONS = {
    1: ((80, 48), [RED, GREEN, BLUE, GREY]),
    2: ((80, 48), [GREEN, RED, GREY, BLUE]),
    3: ((80, 48), [GREY, BLUE, GREEN, RED]),
    4: ((80, 48), [BLUE, GREY, RED, GREEN]),
    6: ((48, 80), [BLUE, RED, GREY, GREEN]),
    8: ((48, 80), [GREEN, GREY, RED, BLUE]),
    5: ((48, 80), [RED, BLUE, GREEN, GREY]),
    7: ((48, 80), [GREY, GREEN, BLUE, RED]),
}


@pytest.mark.parametrize("orientation", sorted(ORIENTATIONS))
def test_exif_orientation_is_applied(orientation):
    stored = quadrants(80, 48, [RED, GREEN, BLUE, GREY])
    exif = Image.Exif()
    exif[0x0112] = orientation
    img = load_image(encode(stored, "JPEG", quality=95, exif=exif.tobytes()))
    size, corners = ORIENTATIONS[orientation]
    assert img.size == size
    assert_close(quadrant_centres(img), corners, tolerance=15)


# -- describe_image ------------------------------------------------------------------------------


def test_describe_image_names_size_mode_and_source():
    img = load_image(encode(_palette_image(), "PNG"))
    text = describe_image(img)
    assert text.startswith("4x1 RGB")
    assert "PNG 4x1 P" in text
    assert describe_image(Image.new("L", (5, 7))) == "5x7 L"

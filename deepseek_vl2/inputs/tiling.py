"""Image tiling: which grid of 384×384 tiles an image gets, how many image tokens that makes, and
the letter-boxing every view goes through (the official processor's geometry)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from PIL import Image, ImageOps


def select_best_resolution(
    width: int, height: int, candidates: Sequence[Sequence[int]]
) -> tuple[int, int]:
    """Pick the candidate (w, h) that keeps the most of a width×height image's resolution.

    The effective resolution of a candidate is ``min(int(W·s)·int(H·s), W·H)`` with
    ``s = min(w/W, h/H)``; the largest wins, ties go to the least wasted area
    ``w·h − effective``, remaining ties to the earlier candidate.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if not candidates:
        raise ValueError("candidate_resolutions is empty")
    best: tuple[int, int] | None = None
    best_effective, best_wasted = -1, math.inf
    for cand_w, cand_h in candidates:
        scale = min(cand_w / width, cand_h / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        wasted = cand_w * cand_h - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (int(cand_w), int(cand_h)), effective, wasted
    assert best is not None
    return best


def num_image_tokens_for_crop(
    tiles_across: int,
    tiles_down: int,
    image_size: int = 384,
    patch_size: int = 14,
    downsample_ratio: int = 2,
) -> int:
    """Number of `<image>` tokens for one image cut into tiles_across × tiles_down local tiles.

    With q = ceil((image_size // patch_size) / downsample_ratio) tokens per tile side (14 for
    384/14/2): global view q·(q+1) (a newline closes each row), one view separator, local grid
    (tiles_down·q)·(tiles_across·q + 1).
    """
    side = math.ceil((image_size // patch_size) / downsample_ratio)
    global_tokens = side * (side + 1)
    local_tokens = (tiles_down * side) * (tiles_across * side + 1)
    return global_tokens + 1 + local_tokens


def letterbox(image: Image.Image, size: tuple[int, int], fill: tuple[int, ...]) -> Image.Image:
    """Resize keeping the aspect ratio (bicubic) and centre on a `size` canvas filled with `fill`.

    These are Pillow's ``ImageOps.pad`` semantics, which the official processor uses. For extreme
    aspect ratios (over 768:1 for a 384 tile) where ``ImageOps.pad`` would shrink the short side to
    0 pixels and fail, the short side is kept at 1 pixel instead.
    """
    width, height = size
    scale = min(width / image.width, height / image.height)
    if round(image.width * scale) >= 1 and round(image.height * scale) >= 1:
        return ImageOps.pad(image, size, method=Image.Resampling.BICUBIC, color=fill)
    resized_size = (max(1, min(width, round(image.width * scale))), max(1, min(height, round(image.height * scale))))
    resized = image.resize(resized_size, Image.Resampling.BICUBIC)
    canvas = Image.new(image.mode, size, fill)
    canvas.paste(resized, ((width - resized_size[0]) // 2, (height - resized_size[1]) // 2))
    return canvas

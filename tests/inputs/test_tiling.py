"""Tiling specifications: best candidate resolution, image-token counts, letter-boxing."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from deepseek_vl2.inputs.tiling import letterbox, num_image_tokens_for_crop, select_best_resolution
from tools.checkpoints import CANDIDATE_RESOLUTIONS

REAL_CANDIDATES = [tuple(size) for size in CANDIDATE_RESOLUTIONS]  # the official 23 layouts


@pytest.mark.parametrize(
    "size, expected",
    [  # from the reference fixtures' case table
        ((200, 150), (384, 384)),
        ((1000, 300), (1152, 384)),
        ((300, 1100), (384, 1152)),
        ((800, 800), (1152, 1152)),
        ((500, 400), (768, 768)),
        ((300, 300), (384, 384)),
        ((640, 480), (768, 768)),
    ],
)
def test_select_best_resolution_reference_sizes(size, expected):
    assert select_best_resolution(*size, REAL_CANDIDATES) == expected


def test_select_best_resolution_truncates_downscaled_size():
    # 821x1231 into 768x1152: scale 768/821, height 1151.53 -> int 1151 (round would give 1152
    # and a tie that the smaller candidate wins on wasted area).
    assert select_best_resolution(821, 1231, [(768, 1152), (1152, 1152)]) == (1152, 1152)


def test_select_best_resolution_ties():
    # a 100x100 image fits fully everywhere: least wasted area wins, then the earlier candidate
    assert select_best_resolution(100, 100, [(768, 768), (384, 384)]) == (384, 384)
    assert select_best_resolution(100, 100, [(768, 384), (384, 768)]) == (768, 384)
    assert select_best_resolution(100, 100, [(384, 768), (768, 384)]) == (384, 768)


def test_select_best_resolution_rejects_bad_input():
    with pytest.raises(ValueError):
        select_best_resolution(0, 10, REAL_CANDIDATES)
    with pytest.raises(ValueError):
        select_best_resolution(10, 10, [])


@pytest.mark.parametrize(
    "crop, tokens",  # facts file example and the fixtures' case table
    [((1, 1), 421), ((2, 1), 617), ((3, 1), 813), ((1, 3), 841), ((3, 3), 2017), ((2, 2), 1023)],
)
def test_num_image_tokens_for_crop(crop, tokens):
    assert num_image_tokens_for_crop(*crop) == tokens


def test_num_image_tokens_for_other_geometry():
    # 224/14 = 16 patches -> 8 tokens per side: 8·9 + 1 + 8·9
    assert num_image_tokens_for_crop(1, 1, image_size=224, patch_size=14, downsample_ratio=2) == 145


@pytest.mark.parametrize("size", [(1, 4000), (4000, 1), (2, 3000)])
def test_extreme_aspect_ratio_letterboxes_to_a_one_pixel_strip(size: tuple[int, int]) -> None:
    image = Image.new("RGB", size, (10, 200, 30))
    boxed = letterbox(image, (384, 384), (127, 127, 127))
    assert boxed.size == (384, 384)
    pixels = np.asarray(boxed)
    assert (pixels == (10, 200, 30)).all(axis=-1).any(), "the image strip must survive letter-boxing"
    assert (pixels == (127, 127, 127)).all(axis=-1).sum() > 384 * 380

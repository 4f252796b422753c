"""Tests for deepseek_vl2.grounding: parsing, pixel conversion, drawing and the CLI.

Expected pixel values are computed by hand from the documented formula
x_px = x * width / 999, y_px = y * height / 999 (2 decimals); drawn rectangles use
floor(x * width / 999) and a line width of max(2, round(min(width, height) / 160)).
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from deepseek_vl2.grounding import (
    GroundingResult,
    draw_grounding,
    label_colors,
    line_width,
    parse_grounding,
    strip_grounding_tags,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
EOS = "<｜end▁of▁sentence｜>"


def _has_problem(result: GroundingResult, *words: str) -> bool:
    return any(all(word in problem for word in words) for problem in result.problems)


# ------------------------------------------------------------------------------ well-formed


def test_single_box_in_pixels_for_640x480():
    answer = f"<|ref|>the giraffe at the back<|/ref|><|det|>[[100, 200, 600, 900]]<|/det|>{EOS}"
    result = parse_grounding(answer, (640, 480))

    assert result.problems == []
    assert [obj.label for obj in result.objects] == ["the giraffe at the back"]
    obj = result.objects[0]
    assert obj.boxes_normalized == [(100, 200, 600, 900)]
    # 100*640/999 = 64.064..., 200*480/999 = 96.096..., 600*640/999 = 384.384..., 900*480/999 = 432.432...
    assert obj.boxes == [(64.06, 96.1, 384.38, 432.43)]
    assert result.image_size == (640, 480)
    assert result.text == "the giraffe at the back"


def test_pixel_conversion_uses_width_for_x_and_height_for_y_on_a_tall_image():
    answer = "<|ref|>pole<|/ref|><|det|>[[333, 100, 666, 500], [0, 0, 999, 999]]<|/det|>"
    result = parse_grounding(answer, (300, 1000))
    # 333*300/999 = 100, 100*1000/999 = 100.1001, 666*300/999 = 200, 500*1000/999 = 500.5005
    assert result.objects[0].boxes == [(100.0, 100.1, 200.0, 500.5), (0.0, 0.0, 300.0, 1000.0)]


def test_multiple_boxes_for_one_label():
    answer = "<|ref|>cats<|/ref|><|det|>[[0, 0, 499, 499], [500, 500, 999, 999]]<|/det|>"
    result = parse_grounding(answer, (999, 1998))
    assert result.problems == []
    assert len(result.objects) == 1
    assert result.objects[0].boxes_normalized == [(0, 0, 499, 499), (500, 500, 999, 999)]
    assert result.objects[0].boxes == [(0.0, 0.0, 499.0, 998.0), (500.0, 1000.0, 999.0, 1998.0)]


def test_grounded_caption_with_several_labels_and_plain_text():
    answer = (
        "<|ref|>A man<|/ref|><|det|>[[10, 20, 300, 900]]<|/det|> is walking a "
        "<|ref|>dog<|/ref|><|det|>[[400, 600, 700, 950]]<|/det|> next to "
        "<|ref|>two trees<|/ref|><|det|>[[0, 0, 100, 500], [850, 0, 999, 520]]<|/det|>."
    )
    result = parse_grounding(answer, (640, 480))
    assert result.problems == []
    assert [obj.label for obj in result.objects] == ["A man", "dog", "two trees"]
    assert [len(obj.boxes_normalized) for obj in result.objects] == [1, 1, 2]
    assert result.labels() == ["A man", "dog", "two trees"]
    assert result.text == "A man is walking a dog next to two trees."


def test_without_image_size_only_normalized_boxes():
    result = parse_grounding("<|ref|>x<|/ref|><|det|>[[1, 2, 3, 4]]<|/det|>", None)
    assert result.objects[0].boxes is None
    assert result.objects[0].boxes_normalized == [(1, 2, 3, 4)]
    assert result.to_dict()["objects"][0]["boxes"] is None


@pytest.mark.parametrize("size", [(0, 10), (10, -1), (10.5, 3), ("640", "480"), (640,)])
def test_invalid_image_size_is_a_value_error(size):
    with pytest.raises(ValueError):
        parse_grounding("<|ref|>x<|/ref|><|det|>[[1, 2, 3, 4]]<|/det|>", size)


def test_answer_without_grounding_is_plain_text():
    result = parse_grounding(f"There is no giraffe in this picture.{EOS}", (640, 480))
    assert result.objects == [] and result.problems == []
    assert result.text == "There is no giraffe in this picture."


def test_strip_grounding_tags_keeps_labels_and_drops_boxes_and_special_tokens():
    answer = (
        "<|grounding|>The <|ref|>red car<|/ref|><|det|>[[1, 2, 3, 4]]<|/det|> is parked near "
        f"<|ref|>a house<|/ref|><|det|>[[5, 6, 7, 8],\n [9, 10, 11, 12]]<|/det|>.{EOS}"
    )
    assert strip_grounding_tags(answer) == "The red car is parked near a house."


# -------------------------------------------------------------------------------- malformed


def test_unterminated_det_at_the_end_keeps_its_boxes():
    result = parse_grounding("<|ref|>dog<|/ref|><|det|>[[10, 20, 30, 40]]", (640, 480))
    assert result.objects[0].label == "dog"
    assert result.objects[0].boxes_normalized == [(10, 20, 30, 40)]
    assert _has_problem(result, "unterminated <|det|>")


def test_unterminated_det_gives_the_following_words_back_to_the_text():
    result = parse_grounding("<|ref|>dog<|/ref|><|det|>[[10, 20, 30, 40]] The dog sleeps.", (640, 480))
    assert result.objects[0].boxes_normalized == [(10, 20, 30, 40)]
    assert result.text == "dog The dog sleeps."


def test_unterminated_ref_before_det_still_labels_the_boxes():
    result = parse_grounding("<|ref|>dog<|det|>[[10, 20, 30, 40]]<|/det|>", (640, 480))
    assert [(o.label, o.boxes_normalized) for o in result.objects] == [("dog", [(10, 20, 30, 40)])]
    assert _has_problem(result, "unterminated <|ref|>")


def test_unclosed_bracket_box_is_used():
    result = parse_grounding("<|ref|>dog<|/ref|><|det|>[[10, 20, 30, 40], [50, 60, 70, 80<|/det|>", None)
    assert result.objects[0].boxes_normalized == [(10, 20, 30, 40), (50, 60, 70, 80)]
    assert _has_problem(result, "unclosed bracket")


def test_det_without_ref_is_labelled_object():
    result = parse_grounding("Here: <|det|>[[10, 20, 30, 40]]<|/det|>", (640, 480))
    assert [(o.label, o.boxes_normalized) for o in result.objects] == [("object", [(10, 20, 30, 40)])]
    assert _has_problem(result, "without <|ref|>")


def test_det_directly_after_another_det_reuses_its_label():
    answer = "<|ref|>cat<|/ref|><|det|>[[1, 2, 3, 4]]<|/det|> <|det|>[[5, 6, 7, 8]]<|/det|>"
    result = parse_grounding(answer, None)
    assert [(o.label, o.boxes_normalized) for o in result.objects] == [
        ("cat", [(1, 2, 3, 4)]),
        ("cat", [(5, 6, 7, 8)]),
    ]
    assert _has_problem(result, "without <|ref|>")


def test_det_after_other_text_does_not_reuse_the_previous_label():
    answer = "<|ref|>cat<|/ref|><|det|>[[1, 2, 3, 4]]<|/det|> and also <|det|>[[5, 6, 7, 8]]<|/det|>"
    result = parse_grounding(answer, None)
    assert [o.label for o in result.objects] == ["cat", "object"]


@pytest.mark.parametrize("box", ["[1, 2, 3]", "[1, 2, 3, 4, 5]", "[]"])
def test_box_with_wrong_count_is_skipped_and_others_kept(box):
    answer = f"<|ref|>dog<|/ref|><|det|>[{box}, [10, 20, 30, 40]]<|/det|>"
    result = parse_grounding(answer, (640, 480))
    assert result.objects[0].boxes_normalized == [(10, 20, 30, 40)]
    assert result.problems, "the bad box must be reported"


def test_flat_list_of_eight_numbers_is_split_into_two_boxes():
    result = parse_grounding("<|ref|>dog<|/ref|><|det|>[[1, 2, 3, 4, 5, 6, 7, 8]]<|/det|>", None)
    assert result.objects[0].boxes_normalized == [(1, 2, 3, 4), (5, 6, 7, 8)]
    assert _has_problem(result, "split")


def test_non_numeric_box_is_skipped():
    answer = "<|ref|>dog<|/ref|><|det|>[[10, twenty, 30, 40], [1, 2, 3, 4]]<|/det|>"
    result = parse_grounding(answer, None)
    assert result.objects[0].boxes_normalized == [(1, 2, 3, 4)]
    assert _has_problem(result, "non-numeric")


def test_only_bad_boxes_gives_no_object():
    result = parse_grounding("<|ref|>dog<|/ref|><|det|>[[a, b, c, d]]<|/det|>", (640, 480))
    assert result.objects == []
    assert _has_problem(result, "'dog'", "no usable box")


def test_decimal_values_are_rounded_to_the_grid():
    result = parse_grounding("<|ref|>dog<|/ref|><|det|>[[10.4, 20.5, 30, 40.9]]<|/det|>", None)
    assert result.objects[0].boxes_normalized == [(10, 21, 30, 41)]
    assert _has_problem(result, "non-integer")


def test_negative_and_too_large_values_are_clamped():
    result = parse_grounding("<|ref|>dog<|/ref|><|det|>[[-7, 20, 1500, 999]]<|/det|>", (640, 480))
    assert result.objects[0].boxes_normalized == [(0, 20, 999, 999)]
    assert result.objects[0].boxes == [(0.0, 9.61, 640.0, 480.0)]  # 20*480/999 = 9.6096
    assert _has_problem(result, "outside 0..999")


def test_swapped_corners_are_reordered():
    result = parse_grounding("<|ref|>dog<|/ref|><|det|>[[600, 900, 100, 200]]<|/det|>", (640, 480))
    assert result.objects[0].boxes_normalized == [(100, 200, 600, 900)]
    assert result.objects[0].boxes == [(64.06, 96.1, 384.38, 432.43)]
    assert _has_problem(result, "swapped")


def test_single_box_without_outer_list_and_spaces_and_newlines():
    answer = "<|ref|> the\n dog <|/ref|><|det|>\n[ 10 ,20,\n  30 , 40 ]\n<|/det|>"
    result = parse_grounding(answer, None)
    assert [(o.label, o.boxes_normalized) for o in result.objects] == [("the dog", [(10, 20, 30, 40)])]
    assert result.problems == []


def test_box_list_without_any_brackets():
    result = parse_grounding("<|ref|>dog<|/ref|><|det|>10, 20, 30, 40<|/det|>", None)
    assert result.objects[0].boxes_normalized == [(10, 20, 30, 40)]
    assert _has_problem(result, "without brackets")


def test_special_tokens_inside_and_around_are_ignored():
    answer = f"<|grounding|><|ref|>dog<|/ref|><|det|>[[10, 20, 30, 40]]<|/det|>{EOS}{EOS}"
    result = parse_grounding(answer, None)
    assert result.objects[0].boxes_normalized == [(10, 20, 30, 40)]
    assert result.problems == [] and result.text == "dog"


def test_ref_without_boxes_and_stray_closing_tags_are_reported():
    result = parse_grounding("<|ref|>dog<|/ref|> runs <|/det|> away<|/ref|>", None)
    assert result.objects == []
    assert _has_problem(result, "'dog'", "without a <|det|>")
    assert _has_problem(result, "stray <|/det|>") and _has_problem(result, "stray <|/ref|>")
    assert result.text == "dog runs away"


def test_random_garbage_never_raises_and_boxes_stay_valid():
    pieces = [
        "<|ref|>", "<|/ref|>", "<|det|>", "<|/det|>", "[", "]", "[[", "]]", ",", " ", "\n", "12",
        "999", "1000", "-3", "4.5", "abc", "cat", EOS, "<|grounding|>", "<|", "|>", "<", "(", ")",
    ]
    rng = random.Random(1234)
    for _ in range(400):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 30)))
        result = parse_grounding(text, (37, 91))
        for obj in result.objects:
            assert obj.label
            for (x1, y1, x2, y2), (px1, py1, px2, py2) in zip(obj.boxes_normalized, obj.boxes):
                assert 0 <= x1 <= x2 <= 999 and 0 <= y1 <= y2 <= 999
                assert 0 <= px1 <= px2 <= 37 and 0 <= py1 <= py2 <= 91
        assert isinstance(strip_grounding_tags(text), str)
        json.dumps(result.to_dict())


# ---------------------------------------------------------------------------------- drawing


def _gradient_image(width: int, height: int) -> Image.Image:
    """RGB image whose pixels all differ from the palette (blue channel fixed at 77)."""
    xs = np.arange(width, dtype=np.uint8)[None, :].repeat(height, axis=0)
    ys = np.arange(height, dtype=np.uint8)[:, None].repeat(width, axis=1)
    pixels = np.stack([xs, ys, np.full_like(xs, 77)], axis=-1)  # [H, W, 3]
    return Image.fromarray(pixels, "RGB")


def test_line_width_scales_with_image_size():
    assert line_width((640, 480)) == 3  # round(480 / 160)
    assert line_width((1920, 1280)) == 8
    assert line_width((100, 80)) == 2  # never thinner than 2
    assert line_width((4000, 3000)) == 19


def test_drawn_rectangle_edges_have_the_label_colour_and_inside_is_unchanged():
    image = _gradient_image(640, 480)
    before = image.tobytes()
    answer = (
        "<|ref|>dog<|/ref|><|det|>[[100, 200, 600, 900]]<|/det|> and "
        "<|ref|>ball<|/ref|><|det|>[[700, 400, 950, 700]]<|/det|>"
    )
    result = parse_grounding(answer, image.size)
    drawn = draw_grounding(image, result)

    assert image.tobytes() == before, "the input image must not be modified"
    assert drawn.size == image.size and drawn is not image
    colours = label_colors(result)
    dog, ball = colours["dog"], colours["ball"]
    assert dog != ball

    # dog: floor(100*640/999)=64, floor(200*480/999)=96, floor(600*640/999)=384, floor(900*480/999)=432
    for x in (64, 65, 66, 382, 383, 384):  # left and right edges, 3 px wide, at y = 300
        assert image.getpixel((x, 300)) != dog
        assert drawn.getpixel((x, 300)) == dog
    for y in (430, 431, 432):  # bottom edge at x = 200
        assert drawn.getpixel((200, y)) == dog
    for point in [(67, 300), (381, 300), (224, 264), (200, 429)]:  # just inside and the centre
        assert drawn.getpixel(point) == image.getpixel(point)
    for point in [(63, 300), (385, 300), (200, 433), (20, 460)]:  # just outside
        assert drawn.getpixel(point) == image.getpixel(point)

    # ball: floor(700*640/999)=448, floor(700*480/999)=336, right edge floor(950*640/999)=608
    assert drawn.getpixel((448, 300)) == ball
    assert drawn.getpixel((608, 300)) == ball
    assert drawn.getpixel((520, 336)) == ball


def test_edge_thickness_follows_line_width_on_a_large_image():
    image = _gradient_image(1920, 1280)
    drawn = draw_grounding(image, "<|ref|>dog<|/ref|><|det|>[[100, 200, 600, 900]]<|/det|>")
    colour = label_colors(parse_grounding("<|ref|>dog<|/ref|><|det|>[[1, 1, 2, 2]]<|/det|>"))["dog"]
    x1 = 192  # floor(100 * 1920 / 999)
    assert all(drawn.getpixel((x, 640)) == colour for x in range(x1, x1 + 8))
    assert drawn.getpixel((x1 + 8, 640)) == image.getpixel((x1 + 8, 640))


def test_draw_keeps_input_mode_and_returns_rgb_for_grey_images():
    image = Image.new("L", (200, 100), 50)
    drawn = draw_grounding(image, "<|ref|>x<|/ref|><|det|>[[0, 0, 999, 999]]<|/det|>")
    assert image.mode == "L" and image.getpixel((0, 0)) == 50
    assert drawn.mode == "RGB"
    assert drawn.getpixel((199, 50)) == label_colors(parse_grounding("<|ref|>x<|/ref|><|det|>[[0,0,1,1]]<|/det|>"))["x"]


def test_colours_are_deterministic_and_distinct_for_many_labels():
    answer = "".join(f"<|ref|>thing {i}<|/ref|><|det|>[[1, 2, 3, 4]]<|/det|>" for i in range(25))
    first = label_colors(parse_grounding(answer))
    second = label_colors(parse_grounding(answer))
    assert first == second
    assert len(set(first.values())) == 25


# -------------------------------------------------------------------------------------- CLI


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "deepseek_vl2.grounding", *args],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )


def test_cli_writes_png_and_json(tmp_path):
    image_path = tmp_path / "in.png"
    _gradient_image(640, 480).save(image_path)
    out_image, out_json = tmp_path / "out.png", tmp_path / "boxes.json"
    answer = "<|ref|>dog<|/ref|><|det|>[[100, 200, 600, 900]]<|/det|>"

    done = _run_cli("--image", str(image_path), "--answer", answer,
                    "--out-image", str(out_image), "--out-json", str(out_json))

    assert done.returncode == 0, done.stderr
    data = json.loads(out_json.read_text(encoding="utf-8"))
    assert data["image_size"] == [640, 480]
    assert data["objects"] == [
        {"label": "dog", "boxes": [[64.06, 96.1, 384.38, 432.43]], "boxes_normalized": [[100, 200, 600, 900]]}
    ]
    assert data["problems"] == []
    with Image.open(out_image) as drawn:
        assert drawn.format == "PNG" and drawn.size == (640, 480)
        assert drawn.convert("RGB").getpixel((64, 300)) == label_colors(parse_grounding(answer))["dog"]


def test_cli_reports_problems_on_stderr_and_still_succeeds(tmp_path):
    image_path = tmp_path / "in.png"
    Image.new("RGB", (300, 200), (10, 10, 10)).save(image_path)
    answer_file = tmp_path / "answer.txt"
    answer_file.write_text("<|ref|>cup<|/ref|><|det|>[[10, 20, 30]], [40, 50, 60, 1200]]", encoding="utf-8")
    out_json = tmp_path / "boxes.json"

    done = _run_cli("--image", str(image_path), "--answer-file", str(answer_file), "--out-json", str(out_json))

    assert done.returncode == 0, done.stderr
    assert "warning:" in done.stderr and "expected 4" in done.stderr
    data = json.loads(out_json.read_text(encoding="utf-8"))
    assert data["objects"][0]["boxes_normalized"] == [[40, 50, 60, 999]]
    assert len(data["problems"]) >= 3  # short box, clamped value, unterminated det


def test_cli_prints_json_to_stdout_without_out_json(tmp_path):
    image_path = tmp_path / "in.png"
    Image.new("RGB", (999, 999)).save(image_path)
    done = _run_cli("--image", str(image_path), "--answer", "<|ref|>a<|/ref|><|det|>[[1, 2, 3, 4]]<|/det|>")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["objects"][0]["boxes"] == [[1.0, 2.0, 3.0, 4.0]]


def test_cli_applies_exif_orientation(tmp_path):
    image_path = tmp_path / "rotated.png"
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    Image.new("RGB", (640, 480)).save(image_path, exif=exif)
    done = _run_cli("--image", str(image_path), "--answer", "<|ref|>a<|/ref|><|det|>[[0, 0, 999, 999]]<|/det|>")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["image_size"] == [480, 640]


def test_cli_fails_clearly_for_missing_or_unreadable_image(tmp_path):
    missing_path = tmp_path / "nope.png"
    missing = _run_cli("--image", str(missing_path), "--answer", "x")
    assert missing.returncode == 1
    assert "error:" in missing.stderr and str(missing_path) in missing.stderr and "not found" in missing.stderr

    not_an_image = tmp_path / "text.png"
    not_an_image.write_text("hello", encoding="utf-8")
    broken = _run_cli("--image", str(not_an_image), "--answer", "x")
    assert broken.returncode == 1
    assert "error:" in broken.stderr and str(not_an_image) in broken.stderr and "could not be read" in broken.stderr
    assert broken.stdout == ""


def test_cli_fails_clearly_for_missing_arguments(tmp_path):
    no_answer = _run_cli("--image", "whatever.png")
    assert no_answer.returncode == 2 and "--answer" in no_answer.stderr

    no_image = _run_cli("--answer", "x")
    assert no_image.returncode == 2 and "--image" in no_image.stderr

    missing_file = _run_cli("--image", "x.png", "--answer-file", str(tmp_path / "absent.txt"))
    assert missing_file.returncode != 0 and "cannot read answer file" in missing_file.stderr


def test_cli_converts_against_the_last_of_several_images(tmp_path):
    """The boxes of a request with several images refer to the last one (as in the official code)."""
    first, last = tmp_path / "first.png", tmp_path / "last.png"
    Image.new("RGB", (300, 200)).save(first)
    _gradient_image(640, 480).save(last)
    out_image = tmp_path / "out.png"
    done = _run_cli("--image", str(first), "--image", str(last), "--out-image", str(out_image),
                    "--answer", "<|ref|>dog<|/ref|><|det|>[[100, 200, 600, 900]]<|/det|>")
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert data["image_size"] == [640, 480]
    assert data["objects"][0]["boxes"] == [[64.06, 96.1, 384.38, 432.43]]
    with Image.open(out_image) as drawn:
        assert drawn.size == (640, 480)


def test_server_log_gives_boxes_in_pixels_of_the_last_image(capsys):
    from deepseek_vl2.serving.service import log_grounding

    images = [Image.new("RGB", (100, 100)), Image.new("RGB", (640, 480))]
    log_grounding("<|ref|>dog<|/ref|><|det|>[[100, 200, 600, 900]]<|/det|>", images)
    logged = capsys.readouterr().out
    assert "boxes in pixels of image 2 (640x480, x1 y1 x2 y2)" in logged
    assert "dog: 64 96 384 432" in logged

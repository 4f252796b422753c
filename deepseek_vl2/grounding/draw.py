"""Draw parsed grounding boxes on the image: one colour per label, outline and label tag."""

from __future__ import annotations

import colorsys

from PIL import Image, ImageDraw, ImageFont

from .parse import GRID_MAX, GroundingResult, NormalizedBox, parse_grounding

_PALETTE: list[tuple[int, int, int]] = [
    (230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128),
]


def label_colors(result: GroundingResult) -> dict[str, tuple[int, int, int]]:
    """Deterministic RGB colour per label, by order of first appearance (distinct labels, distinct colours)."""
    colours: dict[str, tuple[int, int, int]] = {}
    for index, label in enumerate(result.labels()):
        if index < len(_PALETTE):
            colours[label] = _PALETTE[index]
        else:  # golden-ratio hue steps keep later colours apart
            hue = (index * 0.618033988749895) % 1.0
            r, g, b = colorsys.hsv_to_rgb(hue, 0.8, 0.95)
            colours[label] = (round(r * 255), round(g * 255), round(b * 255))
    return colours


def line_width(image_size: tuple[int, int]) -> int:
    """Rectangle outline width in pixels for an image of (width, height): min side / 160, at least 2."""
    return max(2, round(min(image_size) / 160))


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ValueError, OSError, ImportError):  # Pillow without FreeType
        return ImageFont.load_default()


def _draw_rect(box: NormalizedBox, image_size: tuple[int, int]) -> tuple[int, int, int, int]:
    """Grid box -> inclusive integer pixel rectangle inside the image (floor, clipped to size - 1)."""
    width, height = image_size
    x1, y1, x2, y2 = box
    return (
        min(int(x1 * width / GRID_MAX), width - 1),
        min(int(y1 * height / GRID_MAX), height - 1),
        min(int(x2 * width / GRID_MAX), width - 1),
        min(int(y2 * height / GRID_MAX), height - 1),
    )


def draw_grounding(image: Image.Image, result: GroundingResult | str) -> Image.Image:
    """Return a copy of `image` with every box outlined and labelled; the input is not modified.

    Boxes are placed from `boxes_normalized` using this image's own size; with several images in
    the request, pass the last one (the image the boxes refer to). `result` may also be the raw
    answer text. Colours come from `label_colors`; the line width from `line_width`.
    """
    if isinstance(result, str):
        result = parse_grounding(result, image.size)
    canvas = image.copy() if image.mode in ("RGB", "RGBA") else image.convert("RGB")
    draw = ImageDraw.Draw(canvas)
    colours = label_colors(result)
    width = line_width(canvas.size)
    font = _font(max(12, round(min(canvas.size) / 30)))

    rects = [
        (obj.label, _draw_rect(box, canvas.size)) for obj in result.objects for box in obj.boxes_normalized
    ]
    for label, rect in rects:
        draw.rectangle(rect, outline=colours[label], width=width)
    for label, (x1, y1, _, _) in rects:  # labels last so that no outline covers them
        left, top, right, bottom = draw.textbbox((0, 0), label, font=font)
        pad = max(2, width)
        tag_w, tag_h = right - left + 2 * pad, bottom - top + 2 * pad
        tag_y = y1 - tag_h if y1 - tag_h >= 0 else y1 + width
        tag_x = min(x1, max(0, canvas.width - tag_w))
        colour = colours[label]
        luminance = 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2]
        draw.rectangle((tag_x, tag_y, tag_x + tag_w - 1, tag_y + tag_h - 1), fill=colour)
        text_colour = (0, 0, 0) if luminance > 140 else (255, 255, 255)
        draw.text((tag_x + pad - left, tag_y + pad - top), label, fill=text_colour, font=font)
    return canvas

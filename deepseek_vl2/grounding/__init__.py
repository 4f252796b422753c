"""Grounding answers: `<|ref|>label<|/ref|><|det|>[[x1, y1, x2, y2]]<|/det|>` to pixel boxes and pictures."""

from .draw import draw_grounding, label_colors, line_width
from .parse import (
    DEFAULT_LABEL,
    GRID_MAX,
    GroundedObject,
    GroundingResult,
    normalized_to_pixels,
    parse_grounding,
    strip_grounding_tags,
)

__all__ = [
    "DEFAULT_LABEL",
    "GRID_MAX",
    "GroundedObject",
    "GroundingResult",
    "draw_grounding",
    "label_colors",
    "line_width",
    "normalized_to_pixels",
    "parse_grounding",
    "strip_grounding_tags",
]

"""Grounding answers: parse `<|ref|>label<|/ref|><|det|>[[x1, y1, x2, y2], ...]<|/det|>` into boxes.

DeepSeek-VL2 writes box corners as integers on a 0-999 grid relative to the original image's
width and height. This module turns such answers into pixel boxes (`draw.py` outlines them on the image,
`__main__.py` is the CLI ``python -m deepseek_vl2.grounding``).

Parsing never raises on model text: whatever cannot be used is skipped or repaired and described
in `GroundingResult.problems` (see docs/grounding.md for the exact rules).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field


GRID_MAX = 999  # the model's coordinate grid is 0..999 inclusive
DEFAULT_LABEL = "object"

NormalizedBox = tuple[int, int, int, int]  # (x1, y1, x2, y2) on the 0-999 grid
PixelBox = tuple[float, float, float, float]  # (x1, y1, x2, y2) in original-image pixels

# `<|ref|>`, `<|/ref|>`, `<|det|>`, `<|/det|>` (ASCII or full-width bars), and any other special
# token such as `<｜end▁of▁sentence｜>` or `<|grounding|>`, which is dropped.
_TOKEN_RE = re.compile(
    r"(?P<tag><[|｜](?P<close>/?)(?P<name>ref|det)[|｜]>)"
    r"|(?P<special><[|｜][^<>|｜\n]{1,48}[|｜]>)"
)
_INNER_LIST_RE = re.compile(r"\[([^\[\]]*)\]")
_UNCLOSED_LIST_RE = re.compile(r"\[([^\[\]]*)$")
_BOX_TEXT_PREFIX_RE = re.compile(r"[\s\[\](),.+\-\d]*")
_INT_RE = re.compile(r"[+-]?\d+")
_FLOAT_RE = re.compile(r"[+-]?(?:\d+\.\d*|\.\d+)")

@dataclass
class GroundedObject:
    """One `<|ref|>label<|/ref|><|det|>…<|/det|>` pair (or a det with a guessed label)."""

    label: str
    boxes_normalized: list[NormalizedBox]
    boxes: list[PixelBox] | None  # None when parsed without an image size

    def to_dict(self) -> dict:
        """JSON-ready dict: label, boxes (pixels or null), boxes_normalized."""
        return {
            "label": self.label,
            "boxes": None if self.boxes is None else [list(b) for b in self.boxes],
            "boxes_normalized": [list(b) for b in self.boxes_normalized],
        }


@dataclass
class GroundingResult:
    """Parsed grounding answer: objects in order of appearance, plus what could not be parsed."""

    objects: list[GroundedObject] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    image_size: tuple[int, int] | None = None  # (width, height) used for the pixel boxes
    text: str = ""  # the answer as plain text (labels kept, tags and box lists removed)

    def labels(self) -> list[str]:
        """Distinct labels in order of first appearance."""
        return list(dict.fromkeys(obj.label for obj in self.objects))

    def to_dict(self) -> dict:
        """JSON-ready dict: image_size, objects, problems, text."""
        return {
            "image_size": None if self.image_size is None else list(self.image_size),
            "objects": [obj.to_dict() for obj in self.objects],
            "problems": list(self.problems),
            "text": self.text,
        }


def normalized_to_pixels(box: NormalizedBox, image_size: tuple[int, int]) -> PixelBox:
    """Grid box -> pixel box: x * width / 999 and y * height / 999, rounded to 2 decimals."""
    width, height = image_size
    x1, y1, x2, y2 = box
    return (
        round(x1 / GRID_MAX * width, 2),
        round(y1 / GRID_MAX * height, 2),
        round(x2 / GRID_MAX * width, 2),
        round(y2 / GRID_MAX * height, 2),
    )


def _snippet(text: str, limit: int = 40) -> str:
    """Short one-line excerpt of text for problem messages."""
    flat = " ".join(text.split())
    return repr(flat if len(flat) <= limit else flat[: limit - 1] + "…")


def _parse_number(item: str) -> int | None:
    """'12' -> 12, '12.6' -> 13, anything else -> None."""
    if _INT_RE.fullmatch(item):
        return int(item)
    if _FLOAT_RE.fullmatch(item):
        return int(math.floor(float(item) + 0.5))
    return None


def _repair_box(numbers: list[int], label: str, problems: list[str]) -> NormalizedBox:
    """Clamp to 0..999 and order the corners; every repair is recorded in problems."""
    clamped = [min(max(v, 0), GRID_MAX) for v in numbers]
    if clamped != numbers:
        problems.append(f"{label!r}: box {numbers} has values outside 0..{GRID_MAX}; clamped to {clamped}")
    x1, y1, x2, y2 = clamped
    if x1 > x2 or y1 > y2:
        fixed = [min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)]
        problems.append(f"{label!r}: box {clamped} has swapped corners; reordered to {fixed}")
        x1, y1, x2, y2 = fixed
    if x1 == x2 or y1 == y2:
        problems.append(f"{label!r}: box {[x1, y1, x2, y2]} has zero width or height (kept)")
    return (x1, y1, x2, y2)


def _parse_box_list(content: str, label: str, problems: list[str]) -> list[NormalizedBox]:
    """Boxes from the text between `<|det|>` and `<|/det|>`, tolerating malformed lists."""
    groups = [m.group(1) for m in _INNER_LIST_RE.finditer(content)]
    leftover = _INNER_LIST_RE.sub(" ", content)
    unclosed = _UNCLOSED_LIST_RE.search(leftover)
    if unclosed and unclosed.group(1).strip():
        problems.append(f"{label!r}: unclosed bracket in {_snippet(content)}")
        groups.append(unclosed.group(1))
        leftover = leftover[: unclosed.start()]
    if not groups and "[" not in content and content.strip():
        problems.append(f"{label!r}: box list without brackets {_snippet(content)}")
        groups, leftover = [content], ""
    ignored = re.sub(r"[\s\[\],]+", " ", leftover).strip()
    if ignored:
        problems.append(f"{label!r}: ignored text {_snippet(ignored)} in the box list")

    boxes: list[NormalizedBox] = []
    for group in groups:
        items = [item for item in re.split(r"[\s,()]+", group) if item]
        numbers = [_parse_number(item) for item in items]
        if not items:
            problems.append(f"{label!r}: empty box []")
            continue
        if any(n is None for n in numbers):
            problems.append(f"{label!r}: non-numeric box [{group.strip()}] skipped")
            continue
        if any(not _INT_RE.fullmatch(item) for item in items):
            problems.append(f"{label!r}: non-integer values in [{group.strip()}] rounded")
        if len(numbers) % 4 != 0:
            problems.append(f"{label!r}: box [{group.strip()}] has {len(numbers)} numbers, expected 4; skipped")
            continue
        if len(numbers) > 4:
            problems.append(f"{label!r}: flat list of {len(numbers)} numbers split into {len(numbers) // 4} boxes")
        for start in range(0, len(numbers), 4):
            boxes.append(_repair_box(numbers[start : start + 4], label, problems))  # type: ignore[arg-type]
    return boxes


class _Parser:
    """State machine over the answer's tags: outside, inside a ref, inside a det."""

    def __init__(self) -> None:
        self.mode = "out"  # "out" | "ref" | "det"
        self.buffer = ""  # label or box-list text being collected
        self.pending_label: str | None = None  # ref seen, its det not yet
        self.last_det_label: str | None = None
        self.right_after_det = False  # only whitespace since the last det closed
        self.plain: list[str] = []
        self.raw_objects: list[tuple[str, list[NormalizedBox]]] = []
        self.problems: list[str] = []

    def text(self, chunk: str) -> None:
        if self.mode == "out":
            self.plain.append(chunk)
            if chunk.strip():
                self.right_after_det = False
        else:
            self.buffer += chunk

    def tag(self, name: str, closing: bool, raw: str) -> None:
        if self.mode == "ref":
            if name == "ref" and closing:
                self._finish_ref()
                return
            self.problems.append(f"unterminated <|ref|> before {raw}")
            self._finish_ref()
            if closing:  # e.g. <|ref|>x<|/det|>: the wrong closing tag ends the ref
                return
        elif self.mode == "det":
            if name == "det" and closing:
                self._finish_det(self.buffer)
                return
            self.problems.append(f"unterminated <|det|> before {raw}")
            self._finish_unterminated_det()
            if closing:
                return
        elif closing:
            self.problems.append(f"stray {raw} ignored")
            return
        if name == "ref":
            self._drop_pending_label()
            self.right_after_det = False
        self.mode, self.buffer = name, ""

    def end(self) -> None:
        if self.mode == "ref":
            self.problems.append("unterminated <|ref|> at the end of the answer")
            self._finish_ref()
        elif self.mode == "det":
            self.problems.append("unterminated <|det|> at the end of the answer")
            self._finish_unterminated_det()
        self._drop_pending_label()

    def _finish_ref(self) -> None:
        label = " ".join(self.buffer.split())
        self.plain.append(self.buffer.strip())
        if not label:
            self.problems.append(f"empty <|ref|> label; using {DEFAULT_LABEL!r}")
            label = DEFAULT_LABEL
        self.pending_label = label
        self.mode, self.buffer = "out", ""

    def _drop_pending_label(self) -> None:
        if self.pending_label is not None:
            self.problems.append(f"{self.pending_label!r}: <|ref|> without a <|det|> box list")
            self.pending_label = None

    def _finish_unterminated_det(self) -> None:
        # Keep only the box-like prefix; the words after it go back to the plain text.
        boxes_text = _BOX_TEXT_PREFIX_RE.match(self.buffer).group(0)
        if "]" in boxes_text:
            boxes_text = boxes_text[: boxes_text.rindex("]") + 1]
        boxes_text = boxes_text.rstrip()
        rest = self.buffer[len(boxes_text) :]
        self._finish_det(boxes_text)
        if rest.strip():
            self.plain.append(rest)
            self.right_after_det = False

    def _finish_det(self, content: str) -> None:
        if self.pending_label is not None:
            label, self.pending_label = self.pending_label, None
        elif self.right_after_det and self.last_det_label is not None:
            label = self.last_det_label
            self.problems.append(f"<|det|> without <|ref|> directly after the boxes of {label!r}; labelled {label!r}")
        else:
            label = DEFAULT_LABEL
            self.problems.append(f"<|det|> without <|ref|>; labelled {DEFAULT_LABEL!r}")
        boxes = _parse_box_list(content, label, self.problems)
        if boxes:
            self.raw_objects.append((label, boxes))
        else:
            self.problems.append(f"{label!r}: no usable box in {_snippet(content)}")
        self.last_det_label, self.right_after_det = label, True
        self.mode, self.buffer = "out", ""


def _check_image_size(image_size: tuple[int, int] | None) -> tuple[int, int] | None:
    if image_size is None:
        return None
    try:
        width, height = image_size
        valid = int(width) == width and int(height) == height and width > 0 and height > 0
    except (TypeError, ValueError):
        valid = False
    if not valid:
        raise ValueError(f"image_size must be two positive integers (width, height), got {image_size!r}")
    return int(width), int(height)


def _tidy_plain_text(pieces: list[str]) -> str:
    text = "".join(pieces)
    text = re.sub(r"[ \t]{2,}", " ", text)
    text = re.sub(r"[ \t]+\n", "\n", text)
    return text.strip()


def parse_grounding(text: str, image_size: tuple[int, int] | None = None) -> GroundingResult:
    """Parse a grounding answer into labelled boxes.

    `image_size` is the original image's (width, height) — with several images in the request,
    the last one's, the image the boxes refer to; with it every object also gets pixel
    boxes (`x * width / 999`, `y * height / 999`, 2 decimals). Never raises on model text:
    malformed parts are repaired or skipped and described in `problems`. Raises ValueError only
    for an invalid `image_size`.
    """
    size = _check_image_size(image_size)
    parser = _Parser()
    position = 0
    for match in _TOKEN_RE.finditer(text or ""):
        if match.start() > position:
            parser.text(text[position : match.start()])
        position = match.end()
        if match.group("tag"):
            parser.tag(match.group("name"), bool(match.group("close")), match.group("tag"))
    if position < len(text or ""):
        parser.text(text[position:])
    parser.end()

    objects = [
        GroundedObject(
            label=label,
            boxes_normalized=boxes,
            boxes=None if size is None else [normalized_to_pixels(b, size) for b in boxes],
        )
        for label, boxes in parser.raw_objects
    ]
    return GroundingResult(objects, parser.problems, size, _tidy_plain_text(parser.plain))


def strip_grounding_tags(text: str) -> str:
    """The answer as readable text: labels kept, ref/det tags, box lists and special tokens removed."""
    return parse_grounding(text).text

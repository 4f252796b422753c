"""Draw demo.png: DeepSeek-VL2's three-stage training pipeline as a box-and-arrow diagram.

The example image for `cog predict -i image=@demo.png -i prompt="Describe each stage of this
<image> in detail"`. Drawn with Pillow's built-in font only, so the output is the same on every
machine with this Pillow version.

    .venv/bin/python -m tools.make_demo_image            # writes demo.png in the repo root
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

WIDTH, HEIGHT = 1000, 500
BACKGROUND = (255, 255, 255)
INK = (33, 37, 41)
MUTED = (90, 98, 110)
TRAINED_FILL, TRAINED_EDGE = (255, 224, 178), (230, 126, 34)
FROZEN_FILL, FROZEN_EDGE = (214, 228, 240), (84, 130, 170)
STAGE_COLOURS = [(52, 101, 164), (46, 139, 87), (142, 68, 173)]

COMPONENTS = ("DeepSeekMoE LLM", "VL adaptor (2-layer MLP)", "SigLIP vision encoder")


@dataclass(frozen=True)
class Stage:
    """One training stage: its title, which components train, and its data."""

    title: str
    subtitle: str
    trained: tuple[bool, bool, bool]  # per COMPONENTS entry
    data: tuple[str, ...]


STAGES = (
    Stage("Stage 1", "Vision-language alignment", (False, True, True),
          ("image-text pairs", "connect image features", "to the frozen LLM")),
    Stage("Stage 2", "Vision-language pretraining", (True, True, True),
          ("interleaved image-text +", "text-only data; OCR, charts,",
           "grounding; all parameters")),
    Stage("Stage 3", "Supervised fine-tuning", (True, True, True),
          ("instruction and dialogue", "data: answers questions,", "follows the chat format")),
)


def font(size: int) -> ImageFont.FreeTypeFont:
    """Pillow's bundled scalable font (no system fonts needed)."""
    return ImageFont.load_default(size=size)


def centred_text(draw: ImageDraw.ImageDraw, centre_x: float, y: float, text: str,
                 size: int, fill: tuple[int, int, int], bold: bool = False) -> None:
    """Draw ``text`` horizontally centred on ``centre_x`` with its top at ``y``."""
    face = font(size)
    width = draw.textlength(text, font=face)
    draw.text((centre_x - width / 2, y), text, font=face, fill=fill,
              stroke_width=1 if bold else 0, stroke_fill=fill)


def arrow(draw: ImageDraw.ImageDraw, x0: float, x1: float, y: float) -> None:
    """A thick horizontal arrow from x0 to x1 at height y."""
    draw.line([(x0, y), (x1 - 14, y)], fill=MUTED, width=6)
    draw.polygon([(x1, y), (x1 - 18, y - 12), (x1 - 18, y + 12)], fill=MUTED)


def draw_stage(draw: ImageDraw.ImageDraw, stage: Stage, left: int, top: int, width: int,
               height: int, colour: tuple[int, int, int]) -> None:
    """One stage panel: coloured header, the three stacked components, the data below."""
    right, bottom = left + width, top + height
    draw.rounded_rectangle([left, top, right, bottom], radius=14, outline=colour, width=3,
                           fill=(250, 251, 253))
    draw.rounded_rectangle([left, top, right, top + 62], radius=14, fill=colour)
    draw.rectangle([left, top + 40, right, top + 62], fill=colour)
    centre = left + width / 2
    centred_text(draw, centre, top + 8, stage.title, 22, (255, 255, 255), bold=True)
    centred_text(draw, centre, top + 36, stage.subtitle, 17, (255, 255, 255))

    box_left, box_right = left + 22, right - 22
    y = top + 80
    for name, trained in zip(COMPONENTS, stage.trained):
        fill, edge = (TRAINED_FILL, TRAINED_EDGE) if trained else (FROZEN_FILL, FROZEN_EDGE)
        draw.rounded_rectangle([box_left, y, box_right, y + 48], radius=8, fill=fill,
                               outline=edge, width=2)
        centred_text(draw, centre, y + 6, name, 17, INK)
        centred_text(draw, centre, y + 27, "trained" if trained else "frozen", 14, edge)
        y += 48
        if name != COMPONENTS[-1]:
            draw.line([(centre, y), (centre, y + 14)], fill=MUTED, width=2)  # features flow up
            draw.polygon([(centre, y), (centre - 5, y + 7), (centre + 5, y + 7)], fill=MUTED)
            y += 14
    y += 16
    centred_text(draw, centre, y, "Data", 16, colour, bold=True)
    for line in stage.data:
        y += 21
        centred_text(draw, centre, y, line, 15, MUTED)


def draw_pipeline() -> Image.Image:
    """The whole diagram as an RGB image of WIDTH x HEIGHT."""
    image = Image.new("RGB", (WIDTH, HEIGHT), BACKGROUND)
    draw = ImageDraw.Draw(image)
    centred_text(draw, WIDTH / 2, 14, "DeepSeek-VL2: three-stage training pipeline", 28, INK,
                 bold=True)
    panel_width, gap, top, height = 280, 50, 64, 360
    left = (WIDTH - 3 * panel_width - 2 * gap) // 2
    for index, stage in enumerate(STAGES):
        x = left + index * (panel_width + gap)
        draw_stage(draw, stage, x, top, panel_width, height, STAGE_COLOURS[index])
        if index < len(STAGES) - 1:
            arrow(draw, x + panel_width + 6, x + panel_width + gap - 6, top + height / 2)

    legend_y = top + height + 22
    for label, fill, edge, x in (("trained in this stage", TRAINED_FILL, TRAINED_EDGE, 300),
                                 ("frozen (weights fixed)", FROZEN_FILL, FROZEN_EDGE, 540)):
        draw.rounded_rectangle([x, legend_y, x + 26, legend_y + 18], radius=4, fill=fill,
                               outline=edge, width=2)
        draw.text((x + 34, legend_y), label, font=font(16), fill=INK)
    centred_text(draw, WIDTH / 2, legend_y + 30,
                 "Images enter through dynamic tiling (384x384 tiles); arrows show the order of "
                 "the stages.", 14, MUTED)
    return image


def main(argv: list[str] | None = None) -> int:
    """Command line: write the diagram (default demo.png in the repo root)."""
    parser = argparse.ArgumentParser(description="Draw demo.png.")
    default = Path(__file__).resolve().parent.parent / "demo.png"
    parser.add_argument("--output", type=Path, default=default)
    args = parser.parse_args(argv)
    draw_pipeline().save(args.output, optimize=True)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

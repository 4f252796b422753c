"""Draw the example images the README uses: a bar chart, a street scene, a before/after pair.

Our own drawings, made with Pillow's bundled font only (no system fonts), saved as small palette
PNGs (a few KB each). Run from the repository root to rewrite them:

    .venv/bin/python examples/make_examples.py            # writes examples/*.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

HERE = Path(__file__).resolve().parent
WHITE, INK, GREY = (255, 255, 255), (33, 37, 41), (120, 126, 134)


def font(size: int) -> ImageFont.FreeTypeFont:
    """Pillow's bundled scalable font."""
    return ImageFont.load_default(size=size)


def chart() -> Image.Image:
    """A bar chart: monthly rainfall in a made-up town, with a title, axes and values."""
    image = Image.new("RGB", (640, 400), WHITE)
    draw = ImageDraw.Draw(image)
    draw.text((320, 20), "Rainfall in Riverton, 2025 (mm)", font=font(24), fill=INK, anchor="mt")
    months = ("Jan", "Feb", "Mar", "Apr", "May", "Jun")
    values = (78, 64, 52, 31, 18, 9)
    left, bottom, top = 70, 350, 70
    draw.line([(left, top), (left, bottom), (610, bottom)], fill=INK, width=2)
    scale = (bottom - top) / 90
    for tick in range(0, 91, 30):
        y = bottom - tick * scale
        draw.line([(left - 6, y), (left, y)], fill=INK, width=2)
        draw.text((left - 10, y), str(tick), font=font(14), fill=GREY, anchor="rm")
    for index, (month, value) in enumerate(zip(months, values)):
        x0 = left + 20 + index * 88
        y0 = bottom - value * scale
        draw.rectangle([x0, y0, x0 + 56, bottom - 1], fill=(52, 101, 164))
        draw.text((x0 + 28, y0 - 6), str(value), font=font(16), fill=INK, anchor="mb")
        draw.text((x0 + 28, bottom + 8), month, font=font(16), fill=INK, anchor="mt")
    return image


def _car(draw: ImageDraw.ImageDraw, x: int, y: int, colour: tuple[int, int, int]) -> None:
    """A side view of a small car whose bottom-left corner is at (x, y)."""
    draw.rectangle([x, y - 40, x + 150, y - 12], fill=colour)
    draw.polygon([(x + 30, y - 40), (x + 50, y - 68), (x + 105, y - 68), (x + 125, y - 40)], fill=colour)
    draw.rectangle([x + 55, y - 62, x + 100, y - 42], fill=(200, 230, 250))
    for wheel in (x + 32, x + 118):
        draw.ellipse([wheel - 15, y - 27, wheel + 15, y + 3], fill=INK)


def street() -> Image.Image:
    """A street: a red car, a yellow bus, a tree, a traffic light, a house and the sun."""
    image = Image.new("RGB", (640, 420), (190, 225, 245))
    draw = ImageDraw.Draw(image)
    draw.ellipse([530, 25, 600, 95], fill=(250, 200, 40))  # sun
    draw.rectangle([0, 300, 640, 420], fill=(90, 90, 95))  # road
    draw.rectangle([0, 290, 640, 300], fill=(200, 200, 200))  # kerb
    for x in range(20, 640, 90):
        draw.rectangle([x, 357, x + 45, 363], fill=WHITE)  # lane marks
    draw.rectangle([40, 150, 200, 290], fill=(205, 140, 100))  # house
    draw.polygon([(25, 150), (120, 80), (215, 150)], fill=(140, 50, 40))
    draw.rectangle([105, 220, 140, 290], fill=(90, 55, 30))
    draw.rectangle([60, 175, 95, 205], fill=(200, 230, 250))
    draw.rectangle([150, 175, 185, 205], fill=(200, 230, 250))
    draw.rectangle([262, 200, 278, 290], fill=(110, 70, 40))  # tree
    draw.ellipse([215, 105, 325, 215], fill=(60, 150, 60))
    draw.rectangle([400, 170, 406, 290], fill=INK)  # traffic light
    draw.rectangle([388, 110, 418, 175], fill=INK)
    for index, colour in enumerate(((230, 50, 40), (90, 90, 40), (60, 90, 60))):
        draw.ellipse([395, 115 + index * 20, 411, 131 + index * 20], fill=colour)
    draw.rectangle([330, 210, 610, 330], fill=(245, 190, 30))  # bus
    for x in range(345, 600, 52):
        draw.rectangle([x, 225, x + 40, 260], fill=(200, 230, 250))
    for wheel in (375, 560):
        draw.ellipse([wheel - 20, 312, wheel + 20, 352], fill=INK)
    _car(draw, 60, 390, (210, 30, 35))
    return image


def room(after: bool) -> Image.Image:
    """A desk scene; the 'after' picture moves the lamp, turns the mug green and adds a plant."""
    image = Image.new("RGB", (480, 320), (236, 230, 218))
    draw = ImageDraw.Draw(image)
    draw.rectangle([0, 230, 480, 320], fill=(150, 105, 70))  # desk
    draw.rectangle([180, 40, 300, 130], fill=(70, 120, 170))  # picture on the wall
    draw.polygon([(190, 120), (225, 70), (255, 120)], fill=(90, 160, 90))
    draw.polygon([(235, 120), (265, 85), (292, 120)], fill=(60, 130, 70))
    lamp_x = 380 if after else 60
    draw.rectangle([lamp_x + 20, 215, lamp_x + 60, 230], fill=INK)
    draw.rectangle([lamp_x + 36, 140, lamp_x + 44, 215], fill=INK)
    draw.polygon([(lamp_x, 140), (lamp_x + 20, 95), (lamp_x + 60, 95), (lamp_x + 80, 140)],
                 fill=(240, 200, 60))
    mug = (40, 150, 70) if after else (200, 40, 40)
    draw.rectangle([215, 180, 255, 230], fill=mug)
    draw.arc([245, 190, 270, 215], start=270, end=90, fill=mug, width=6)
    draw.rectangle([290, 205, 350, 230], fill=WHITE)  # book
    draw.line([(290, 217), (350, 217)], fill=GREY, width=1)
    if after:
        draw.polygon([(80, 230), (90, 190), (130, 190), (140, 230)], fill=(170, 90, 50))  # plant
        for dx, dy in ((-20, -40), (0, -55), (20, -40)):
            draw.ellipse([110 + dx - 12, 190 + dy, 110 + dx + 12, 190 + dy + 40], fill=(50, 140, 60))
    return image


def save(image: Image.Image, path: Path) -> None:
    """Save as a palette PNG: flat drawings stay a few KB."""
    image.quantize(colors=64, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(
        path, optimize=True)


def main() -> None:
    """Write every example image into the output folder."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE, help="folder (default: examples/)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for name, image in (("chart.png", chart()), ("street.png", street()),
                        ("before.png", room(after=False)), ("after.png", room(after=True))):
        save(image, args.out / name)
        print(args.out / name, f"{(args.out / name).stat().st_size} bytes")


if __name__ == "__main__":
    main()

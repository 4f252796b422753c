"""CLI: ``python -m deepseek_vl2.grounding --image IMG --answer TEXT --out-image out.png --out-json boxes.json``.

With several images in the request, pass them all (``--image`` once each, in order): the boxes
refer to the last one, as in the official code, and are drawn on it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from PIL import Image

from deepseek_vl2.inputs.images import load_image

from .draw import draw_grounding
from .parse import parse_grounding



def _load_image(path: str) -> Image.Image:
    """Decode the image as the model sees it (EXIF orientation applied, RGB), at full size.

    `images.load_image` would decode very large JPEGs at reduced scale; the limit is lifted here so
    that pixel boxes refer to the file's own size (Pillow's decompression-bomb limit still holds).
    """
    return load_image(path, max_pixels=sys.maxsize, name=f"--image {path}")


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the process exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m deepseek_vl2.grounding",
        description="Turn a DeepSeek-VL2 grounding answer into pixel boxes (JSON) and an annotated image.",
    )
    parser.add_argument("--image", required=True, action="append",
                        help="an image of the request, in order (repeat for several); the boxes refer to the last")
    answer = parser.add_mutually_exclusive_group(required=True)
    answer.add_argument("--answer", help="the model's answer text")
    answer.add_argument("--answer-file", help="file holding the model's answer text (UTF-8)")
    parser.add_argument("--out-image", help="where to write the annotated PNG")
    parser.add_argument("--out-json", help="where to write the boxes as JSON (default: standard output)")
    args = parser.parse_args(argv)

    if args.answer_file is not None:
        try:
            text = Path(args.answer_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            print(f"error: cannot read answer file {args.answer_file}: {error}", file=sys.stderr)
            return 1
    else:
        text = args.answer
    last = args.image[-1]  # the image a grounding answer's boxes refer to
    try:
        image = _load_image(last)
    except ValueError as error:  # images.ImageInputError: its message names the file and the reason
        print(f"error: {error}", file=sys.stderr)
        return 1
    except OSError as error:
        print(f"error: cannot read image {last}: {error}", file=sys.stderr)
        return 1

    result = parse_grounding(text, image.size)
    for problem in result.problems:
        print(f"warning: {problem}", file=sys.stderr)
    payload = json.dumps(result.to_dict(), indent=2, ensure_ascii=False)
    try:
        if args.out_image:
            draw_grounding(image, result).save(args.out_image, format="PNG")
        if args.out_json:
            Path(args.out_json).write_text(payload + "\n", encoding="utf-8")
        else:
            print(payload)
    except OSError as error:
        print(f"error: cannot write output: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

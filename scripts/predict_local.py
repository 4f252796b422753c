"""Run one prediction with predict.py's runner, without Docker or an HTTP server.

    .venv/bin/python scripts/predict_local.py --weights weights --image demo.png --prompt "Describe each stage of this <image> in detail"
    .venv/bin/python scripts/predict_local.py --image a.png --image b.png --prompt "Compare them."
    .venv/bin/python scripts/predict_local.py --quantize int8 --image demo.png --prompt "Describe <image>."

The checkpoint comes from --weights, else COG_WEIGHTS, else weights/ (downloaded when empty),
exactly as in the container. Local image files are the operator's own, so they are passed as
the server passes downloaded inputs. Input defaults are predict.py's Input() declarations. The
answer is streamed to stdout; logs go to stderr. --quantize sets DSVL2_QUANTIZE (the expert
weight format: none, int8, fp8 or auto) for this run.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import predict  # noqa: E402
from cog import Path as CogPath  # noqa: E402
from deepseek_vl2.serving import coglet_bridge  # noqa: E402
from deepseek_vl2.serving.inputs import IMAGE_INPUTS  # noqa: E402
from deepseek_vl2.model.quantization import QUANTIZE_ENV, QUANTIZE_SETTINGS  # noqa: E402

# Command-line options for the run() inputs that are not files or the prompt: name -> type.
OPTIONS = {"system_prompt": str, "temperature": float, "top_p": float, "top_k": int,
           "repetition_penalty": float, "max_length_tokens": int, "stop_sequences": str, "seed": int}


def main() -> None:
    """Parse the options, load the model, stream one answer to stdout."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", help="checkpoint directory or URL (default: COG_WEIGHTS, else weights/)")
    parser.add_argument("--image", action="append", default=[], help="image file; repeat for up to 4 (none: a text-only question)")
    parser.add_argument("--messages", help="earlier turns as a JSON array (the messages input)")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--quantize", help=f"expert weight format: {', '.join(QUANTIZE_SETTINGS)} "
                                           f"(default: {QUANTIZE_ENV}, else auto; checked at setup)")
    for name, kind in OPTIONS.items():
        default = predict.DECLARED.defaults.get(name)
        parser.add_argument("--" + name.replace("_", "-"), type=kind, default=default,
                            help=f"default: {default}")
    args = parser.parse_args()
    if len(args.image) > len(IMAGE_INPUTS):
        parser.error(f"at most {len(IMAGE_INPUTS)} images")
    for image in args.image:
        if not Path(image).is_file():
            parser.error(f"no such image file: {image}")
    images = {name: CogPath(Path(path).resolve()) for name, path in zip(IMAGE_INPUTS, args.image)}
    if args.quantize:
        os.environ[QUANTIZE_ENV] = args.quantize
    runner = predict.Predictor()
    with contextlib.redirect_stdout(sys.stderr):
        runner.setup(args.weights)
    arguments = {name: getattr(args, name) for name in OPTIONS}
    with contextlib.redirect_stdout(sys.stderr), coglet_bridge.direct_call():
        pieces = asyncio.run(runner.run(image=images.get("image"), image_2=images.get("image_2"),
                                        image_3=images.get("image_3"), image_4=images.get("image_4"),
                                        prompt=args.prompt, messages=args.messages, **arguments))
        for piece in pieces:  # predict()'s logs go to stderr, the answer to stdout
            print(piece, end="", flush=True, file=sys.__stdout__)
    print(file=sys.__stdout__)


if __name__ == "__main__":
    main()

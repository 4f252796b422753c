"""Run one prediction with predict.py's Predictor, without Docker or an HTTP server.

    python scripts/predict_local.py --image demo.png --prompt "Describe each stage of this <image> in detail"
    python scripts/predict_local.py --weights /data/deepseek-vl2-tiny --image a.png --image b.png --prompt "Compare them."

The checkpoint comes from --weights, else COG_WEIGHTS, else weights/ (downloaded when empty),
exactly as in the container. The answer is streamed to stdout; logs go to stderr.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import predict  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", help="checkpoint directory (default: COG_WEIGHTS, else weights/)")
    parser.add_argument("--image", action="append", required=True, help="image file; repeat for up to 4")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--system-prompt")
    parser.add_argument("--temperature", type=float, default=0.1)
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--repetition-penalty", type=float, default=1.1)
    parser.add_argument("--max-length-tokens", type=int, default=2048)
    parser.add_argument("--stop-sequences")
    parser.add_argument("--seed", type=int)
    args = parser.parse_args()
    if len(args.image) > len(predict.IMAGE_INPUTS):
        parser.error(f"at most {len(predict.IMAGE_INPUTS)} images")
    images = dict(zip(predict.IMAGE_INPUTS, map(Path, args.image)))
    predictor = predict.Predictor()
    with contextlib.redirect_stdout(sys.stderr):
        predictor.setup(args.weights)
    kwargs = dict(
        image=images["image"], image_2=images.get("image_2"), image_3=images.get("image_3"),
        image_4=images.get("image_4"), prompt=args.prompt, system_prompt=args.system_prompt,
        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        repetition_penalty=args.repetition_penalty, max_length_tokens=args.max_length_tokens,
        stop_sequences=args.stop_sequences, seed=args.seed,
    )
    with contextlib.redirect_stdout(sys.stderr):  # predict()'s logs; the answer goes to stdout
        for piece in predictor.predict(**kwargs):
            print(piece, end="", flush=True, file=sys.__stdout__)
    print(file=sys.__stdout__)


if __name__ == "__main__":
    main()

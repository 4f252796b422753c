"""Eager against compiled decode of one model, alternating runs in one process.

    .venv/bin/python scripts/compare_compiled.py CHECKPOINT [--tokens 64] [--rounds 3]
        [--threads 2] [--dtype bfloat16] [--device cpu] [--no-image]

Both generators share the loaded weights; the compiled one is warmed up first (the seconds are
printed). Each round generates ``--tokens`` greedy tokens with ``ignore_eos`` for a 300×200 image
and a short question, eager then compiled, and prints decode tok/s and time to first token.
``scripts/benchmark.py`` is the full benchmark; this is the engine's quick check.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deepseek_vl2.engine.generation import Generator  # noqa: E402
from deepseek_vl2.engine.sampling import SamplingParams  # noqa: E402
from deepseek_vl2.inputs.processor import DeepseekVL2Processor  # noqa: E402
from deepseek_vl2.model.checkpoint import load_model  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    """Parse options, run the rounds, print one line per run and the medians."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-image", action="store_true", help="a text-only prompt (short prefill)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = load_model(args.checkpoint, device=args.device, dtype=getattr(torch, args.dtype))
    processor = DeepseekVL2Processor.from_pretrained(args.checkpoint)
    max_len = 1024
    runs = {"eager": Generator(model, processor, compile=False, max_len=max_len),
            "compiled": Generator(model, processor, compile=True, max_len=max_len)}
    image = [] if args.no_image else [Image.new("RGB", (300, 200), (120, 30, 200))]
    inputs = runs["eager"].prepare("Describe this <image> in detail." if image else "Describe a cat in detail.", image)
    prompt = int(inputs.input_ids.numel())
    started = time.perf_counter()
    runs["compiled"].warmup(rows=[1], kv_lens=[-(-(prompt + args.tokens + 1) // 256) * 256], modes=["greedy"])
    print(f"prompt {prompt} tokens; compiled warm-up {time.perf_counter() - started:.1f} s", flush=True)
    params = SamplingParams(temperature=0.0, max_new_tokens=args.tokens, ignore_eos=True)
    speeds: dict[str, list[float]] = {name: [] for name in runs}
    tokens: dict[str, list[int]] = {}
    for _ in range(args.rounds):
        for name, generator in runs.items():
            tokens[name] = generator.generate_ids(inputs, params)
            stats = generator.last_stats
            speeds[name].append(stats.tokens_per_second)
            print(f"{name:9s} decode {stats.tokens_per_second:6.2f} tok/s  first token {stats.time_to_first_token:.3f} s",
                  flush=True)
    eager, compiled = statistics.median(speeds["eager"]), statistics.median(speeds["compiled"])
    print(f"median decode: eager {eager:.2f} tok/s, compiled {compiled:.2f} tok/s, ratio {compiled / eager:.2f}; "
          f"same tokens: {tokens['eager'] == tokens['compiled']}")


if __name__ == "__main__":
    main()

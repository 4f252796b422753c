"""Measure the bf16 check's margin on checkpoints and prompts it was not written against.

Random checkpoints (tools/checkpoints.py, seeds other than the tests' and the
fixtures') of every variant, one with group-limited routing, each on text-only, multi-turn and
image prompts (synthetic images of several sizes); and the three injected bf16 bugs
(tools/parity/bf16_bugs.py) on one image prompt per checkpoint. Prints, per case, bounds 1 and 2 as
fractions of their allowance (> 1 fails) and a summary: the clean cases' largest fraction, the
bugs' smallest, and the margin between them.

    nice python -m tools.parity.bf16_margin_sweep [--workdir /tmp/bf16_sweep] [--json out.json]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from tools.parity.bf16_bounds import bf16_figures, bf16_problems, ratio_to_bound
from tools.parity.bf16_bugs import BF16_BUGS
from tools.parity.bf16_check import bf16_runs, perturb_by_float32_rounding, reference_runs
from tools.checkpoints import make_checkpoint
from deepseek_vl2.inputs.processor import DeepseekVL2Processor
from deepseek_vl2.model.checkpoint import load_model

# (variant, seed, overrides): seeds unused elsewhere; base once with group-limited routing.
CHECKPOINTS = [("tiny", 21, {}), ("small", 22, {}), ("base", 23, dict(n_group=4, topk_group=2)), ("base", 24, {})]
USER, ASSISTANT = "<|User|>", "<|Assistant|>"
# name: (turns of (user, assistant) ending with the open assistant turn, image sizes (w, h))
PROMPTS = {
    "text": ([("Write a short poem about the sea and the wind.", "")], []),
    "text_two_turn": ([("What is the capital of France?", "Paris is the capital."),
                       ("And how many people live there, roughly?", "")], []),
    "image_320x180": ([("<image>\nWhat is in this picture?", "")], [(320, 180)]),
    "image_500x700_two_turn": ([("<image>\nDescribe the shapes.", "Two shapes on a plain background."),
                                ("Which one is larger?", "")], [(500, 700)]),
}
BUG_PROMPT = "image_320x180"


def synthetic_image(size: tuple[int, int], seed: int) -> Image.Image:
    """A plain background with a few coloured rectangles and ellipses (seeded)."""
    generator = torch.Generator().manual_seed(seed)
    draw_values = lambda n, high: torch.randint(0, high, (n,), generator=generator).tolist()  # noqa: E731
    image = Image.new("RGB", size, tuple(draw_values(3, 256)))
    draw = ImageDraw.Draw(image)
    for shape in range(4):
        x0, x1 = sorted(draw_values(2, size[0]))
        y0, y1 = sorted(draw_values(2, size[1]))
        (draw.rectangle if shape % 2 else draw.ellipse)((x0, y0, x1 + 1, y1 + 1), fill=tuple(draw_values(3, 256)))
    return image


def conversation(prompt: str) -> tuple[list[dict], list[Image.Image]]:
    """The messages and images of one named prompt."""
    turns, sizes = PROMPTS[prompt]
    messages = [dict(role=role, content=text) for user, answer in turns
                for role, text in ((USER, user), (ASSISTANT, answer))]
    return messages, [synthetic_image(size, seed) for seed, size in enumerate(sizes)]


def sweep(workdir: Path) -> list[dict]:
    """Every clean case and every bug case; one printed line each."""
    rows = []
    for variant, seed, overrides in CHECKPOINTS:
        name = f"{variant}-seed{seed}" + ("-grouped" if overrides else "")
        folder = make_checkpoint(workdir / name, variant=variant, seed=seed, **overrides)
        processor = DeepseekVL2Processor.from_pretrained(folder)
        exact = load_model(folder, device="cpu", dtype=torch.float64)
        perturbed = load_model(folder, device="cpu", dtype=torch.float64)
        perturb_by_float32_rounding(perturbed)
        bf16 = load_model(folder, device="cpu", dtype=torch.bfloat16)
        for prompt in PROMPTS:
            messages, images = conversation(prompt)
            inputs = processor.process(messages, images, system_prompt="")
            reference = reference_runs(exact, perturbed, inputs)
            for bug in [None] + (list(BF16_BUGS) if prompt == BUG_PROMPT else []):
                with BF16_BUGS[bug](bf16) if bug else contextlib.nullcontext():
                    figures = bf16_figures(bf16_runs(bf16, inputs, reference))
                row = dict(checkpoint=name, prompt=prompt, bug=bug, held=ratio_to_bound(figures, "held"),
                           free=ratio_to_bound(figures, "free"), fails=bool(bf16_problems(figures)), **figures)
                rows.append(row)
                print(f"{name:20s} {prompt:23s} {bug or 'clean':27s} {row['positions']:5d} positions  "
                      f"bound 1 {row['held']:.3f} (ratio {row['held_ratio']:.3f}, allowed {row['held_allowed']:.3f})  "
                      f"bound 2 {row['free']:.3f} over {row['free_prefix_positions']:4d}  {'FAIL' if row['fails'] else 'ok'}",
                      flush=True)
    return rows


def main() -> None:
    """Run the sweep and print the margin between clean and buggy runs."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, help="where the checkpoints are written (default: a temporary folder)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        rows = sweep(args.workdir or Path(scratch))
    clean = [r for r in rows if r["bug"] is None]
    bugs = [r for r in rows if r["bug"] is not None]
    clean_max = max(max(r["held"], r["free"]) for r in clean)
    bug_min = min(max(r["held"], r["free"]) for r in bugs)
    print(f"summary: {sum(r['fails'] for r in clean)}/{len(clean)} clean cases fail, largest fraction of a bound "
          f"{clean_max:.3f}; {sum(r['fails'] for r in bugs)}/{len(bugs)} bug cases fail, smallest fraction of the "
          f"larger bound {bug_min:.3f}; margin {bug_min / clean_max:.3f}x")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1, default=str))


if __name__ == "__main__":
    main()

"""Measure how far bfloat16 inference drifts from float32 on the reference fixture cases.

For every (config, case) in DSVL2_REFERENCE_DIR it runs the processor once, then the model in
float32 and in bfloat16 (CPU by default), and prints the max |logit difference| over the last 4
prompt positions and how many of the 16 greedy tokens agree (and whether the whole continuation
is identical). Usage:

    python scripts/measure_bf16_drift.py [--device cpu|cuda] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from deepseek_vl2.model.checkpoint import load_model  # noqa: E402
from deepseek_vl2.engine.generation import Generator  # noqa: E402
from deepseek_vl2.inputs.processor import DeepseekVL2Processor  # noqa: E402
from deepseek_vl2.engine.sampling import SamplingParams  # noqa: E402
from reference_data import case_names, checkpoint_dir, config_names, expected_outputs, has_outputs, load_case_inputs  # noqa: E402


def last_logits(gen: Generator, inputs, n: int = 4) -> torch.Tensor:
    """Logits of the last n prompt positions of one uncached forward, float32 on the CPU."""
    with torch.inference_mode():
        embeds = gen.model.embed_inputs(inputs.input_ids, inputs.images, inputs.images_seq_mask, inputs.images_spatial_crop)
        positions = torch.arange(embeds.shape[0], device=embeds.device).unsqueeze(0)
        return gen.model.forward_embeds(embeds.unsqueeze(0), positions)[0, -n:].float().cpu()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rows = []
    for config in config_names():
        processor = DeepseekVL2Processor.from_pretrained(checkpoint_dir(config))
        f32 = Generator(load_model(checkpoint_dir(config), device=args.device, dtype=torch.float32), processor)
        bf16 = Generator(load_model(checkpoint_dir(config), device=args.device, dtype=torch.bfloat16), processor)
        for case in case_names():
            if not has_outputs(config, case):
                continue
            _, meta = expected_outputs(config, case)
            conversation, images = load_case_inputs(case)
            inputs = processor.process(conversation, images)
            n_new = meta["greedy"]["n_new"]
            params = SamplingParams(temperature=0.0, max_new_tokens=n_new)
            ref_tokens = f32.generate_ids(inputs, params)
            low_tokens = bf16.generate_ids(inputs, params)
            agree = next((i for i, (a, b) in enumerate(zip(ref_tokens, low_tokens)) if a != b), min(len(ref_tokens), len(low_tokens)))
            diff = (last_logits(f32, inputs) - last_logits(bf16, inputs)).abs().max().item()
            scale = last_logits(f32, inputs).abs().max().item()
            rows.append(dict(config=config, case=case, max_logit_diff=diff, logit_absmax=scale,
                             greedy_prefix_agree=agree, greedy_len=len(ref_tokens), identical=ref_tokens == low_tokens))
            print(f"{config:6s} {case:16s} max|Δlogit| {diff:7.4f} (|logit|max {scale:5.2f})  "
                  f"greedy agree {agree:2d}/{len(ref_tokens):2d} {'identical' if ref_tokens == low_tokens else 'differs'}",
                  flush=True)
    same = sum(r["identical"] for r in rows)
    print(f"summary: {same}/{len(rows)} greedy continuations identical; "
          f"max |Δlogit| {max(r['max_logit_diff'] for r in rows):.4f}; "
          f"median {sorted(r['max_logit_diff'] for r in rows)[len(rows) // 2]:.4f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()

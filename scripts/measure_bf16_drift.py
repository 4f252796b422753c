"""Measure how far bfloat16 inference drifts from float32 on the reference fixture cases.

For every (config, case) in DSVL2_REFERENCE_DIR it runs the processor once, then the model in
bfloat16 on ``--device`` and prints the max |logit difference| over the last 4 prompt positions
against the official float32 logits of the fixture (``logits_last4``), and how many of the 16
greedy tokens agree with the fixture's greedy continuation (and whether it is identical). The
figures depend on the device and, on the CPU, on the processor's kernels (docs/correctness.md).

    python scripts/measure_bf16_drift.py [--device cpu|cuda] [--json out.json] [--configs tiny] [--cases a,b]
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from deepseek_vl2.engine.generation import Generator  # noqa: E402
from deepseek_vl2.engine.sampling import SamplingParams  # noqa: E402
from deepseek_vl2.inputs.processor import DeepseekVL2Processor  # noqa: E402
from deepseek_vl2.model.checkpoint import load_model  # noqa: E402
from reference_data import case_names, checkpoint_dir, config_names, expected_outputs, has_outputs, load_case_inputs  # noqa: E402


def last_logits(gen: Generator, inputs, n: int = 4) -> torch.Tensor:
    """Logits of the last n prompt positions of one uncached forward, float32 on the CPU."""
    with torch.inference_mode():
        embeds = gen.model.embed_inputs(inputs.input_ids, inputs.images, inputs.images_seq_mask, inputs.images_spatial_crop)
        positions = torch.arange(embeds.shape[0], device=embeds.device).unsqueeze(0)
        return gen.model.forward_embeds(embeds.unsqueeze(0), positions)[0, -n:].float().cpu()


def measure(config: str, case: str, gen: Generator, processor: DeepseekVL2Processor) -> dict:
    """bf16 figures of one case against the fixture's float32 outputs."""
    expected, meta = expected_outputs(config, case)
    conversation, images = load_case_inputs(case)
    inputs = processor.process(conversation, images, system_prompt="")
    reference_tokens = meta["greedy"]["new_tokens"]
    tokens = gen.generate_ids(inputs, SamplingParams(temperature=0.0, max_new_tokens=meta["greedy"]["n_new"], stop=()))
    agree = next((i for i, (a, b) in enumerate(zip(reference_tokens, tokens)) if a != b),
                 min(len(reference_tokens), len(tokens)))
    reference = expected["logits_last4"]
    diff = (last_logits(gen, inputs) - reference).abs().max().item()
    return dict(config=config, case=case, max_logit_diff=diff, logit_absmax=reference.abs().max().item(),
                greedy_prefix_agree=agree, greedy_len=len(reference_tokens), identical=tokens == reference_tokens)


def main() -> None:
    """Measure every selected (config, case); print one line each and a summary."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--configs", help="comma-separated configs (default: all)")
    parser.add_argument("--cases", help="comma-separated cases (default: all)")
    args = parser.parse_args()
    configs = args.configs.split(",") if args.configs else config_names()
    cases = args.cases.split(",") if args.cases else case_names()
    rows = []
    for config in configs:
        processor = DeepseekVL2Processor.from_pretrained(checkpoint_dir(config))
        gen = Generator(load_model(checkpoint_dir(config), device=args.device, dtype=torch.bfloat16), processor,
                        compile=False)
        for case in cases:
            if not has_outputs(config, case):
                continue
            row = measure(config, case, gen, processor)
            rows.append(row)
            print(f"{config:6s} {case:16s} max|Δlogit| {row['max_logit_diff']:7.4f} (|logit|max {row['logit_absmax']:5.2f})  "
                  f"greedy agree {row['greedy_prefix_agree']:2d}/{row['greedy_len']:2d} "
                  f"{'identical' if row['identical'] else 'differs'}", flush=True)
    diffs = sorted(r["max_logit_diff"] for r in rows)
    summary = dict(cases=len(rows), identical=sum(r["identical"] for r in rows), max_logit_diff=diffs[-1],
                   median_logit_diff=diffs[len(diffs) // 2], device=args.device,
                   machine=torch.cuda.get_device_name(0) if args.device.startswith("cuda") else
                   f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
                   torch=torch.__version__, date=time.strftime("%Y-%m-%d"))
    print(f"summary: {summary['identical']}/{len(rows)} greedy continuations identical to the float32 reference; "
          f"max |Δlogit| {summary['max_logit_diff']:.4f}; median {summary['median_logit_diff']:.4f}")
    if args.json:
        args.json.write_text(json.dumps({"summary": summary, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()

"""Measure how far 8-bit expert weights (and bf16) drift from the float32 reference fixtures.

For every (config, case) in DSVL2_REFERENCE_DIR and every format it loads the fixture checkpoint
(``bf16``: every weight and activation in bfloat16; ``int8`` / ``fp8``: routed and shared experts
stored in 8 bits, everything else and the activations float32, so the figure is the weight
format's own error) and prints, against the official float32 outputs of the fixture:

* teacher-forced log-prob drift: |log p(next prompt token)| differences over every prompt
  position (``teacher_forced_logprobs``), max and mean;
* max |logit difference| over the last 4 prompt positions (``logits_last4``);
* greedy agreement: how many of the fixture's greedy tokens are reproduced before the first
  difference (eager decode).

    python -m tools.parity.measure_quantized_drift [--formats bf16,int8,fp8] [--configs tiny] [--cases a,b] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch


from deepseek_vl2.engine.generation import Generator  # noqa: E402
from deepseek_vl2.engine.sampling import SamplingParams  # noqa: E402
from deepseek_vl2.engine.scheduler import BatchScheduler  # noqa: E402
from deepseek_vl2.inputs.processor import DeepseekVL2Processor  # noqa: E402
from deepseek_vl2.model.checkpoint import load_model  # noqa: E402
from tools.parity.reference_data import case_names, checkpoint_dir, config_names, expected_outputs, has_outputs, load_case_inputs  # noqa: E402

FORMATS = {"bf16": (torch.bfloat16, "none"), "int8": (torch.float32, "int8"), "fp8": (torch.float32, "fp8")}


def load_generator(config: str, fmt: str) -> Generator:
    """An eager generator of a fixture checkpoint in one of :data:`FORMATS`, on the CPU."""
    dtype, quantize = FORMATS[fmt]
    model = load_model(checkpoint_dir(config), device="cpu", dtype=dtype, quantize=quantize)
    return Generator(model, DeepseekVL2Processor.from_pretrained(checkpoint_dir(config)), compile=False)


def measure(config: str, case: str, gen: Generator) -> dict:
    """Drift figures of one case against the fixture's float32 outputs."""
    expected, meta = expected_outputs(config, case)
    conversation, images = load_case_inputs(case)
    inputs = gen.processor.process(conversation, images, system_prompt="")
    with torch.inference_mode():
        embeds = gen.model.embed_inputs(inputs.input_ids, inputs.images, inputs.images_seq_mask,
                                        inputs.images_spatial_crop)
        positions = torch.arange(embeds.shape[0]).unsqueeze(0)
        logits = gen.model.forward_embeds(embeds.unsqueeze(0), positions)[0].float()
    ids = inputs.input_ids
    logprobs = torch.log_softmax(logits[:-1], dim=-1).gather(1, ids[1:].unsqueeze(1)).squeeze(1)
    drift = (logprobs - expected["teacher_forced_logprobs"]).abs()
    last4 = (logits[-4:] - expected["logits_last4"]).abs().max().item()
    reference_tokens = meta["greedy"]["new_tokens"]
    with BatchScheduler(gen) as scheduler:
        tokens = scheduler.run(inputs, SamplingParams(temperature=0.0, max_new_tokens=meta["greedy"]["n_new"],
                                                      stop=())).tokens
    agree = next((i for i, (a, b) in enumerate(zip(reference_tokens, tokens)) if a != b),
                 min(len(reference_tokens), len(tokens)))
    return dict(config=config, case=case, logprob_drift_max=drift.max().item(), logprob_drift_mean=drift.mean().item(),
                positions=int(drift.numel()), max_logit_diff_last4=last4,
                logit_absmax=expected["logits_last4"].abs().max().item(),
                greedy_prefix_agree=agree, greedy_len=len(reference_tokens))


def main() -> None:
    """Measure every selected (format, config, case); print one line each and a summary per format."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--formats", default=",".join(FORMATS))
    parser.add_argument("--configs", help="comma-separated configs (default: all)")
    parser.add_argument("--cases", help="comma-separated cases (default: all)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    configs = args.configs.split(",") if args.configs else config_names()
    cases = args.cases.split(",") if args.cases else case_names()
    rows = []
    for fmt in args.formats.split(","):
        for config in configs:
            gen = load_generator(config, fmt)
            for case in cases:
                if not has_outputs(config, case):
                    continue
                row = dict(format=fmt, **measure(config, case, gen))
                rows.append(row)
                print(f"{fmt:5s} {config:6s} {case:16s} log-prob drift max {row['logprob_drift_max']:.4f} "
                      f"mean {row['logprob_drift_mean']:.4f}  last4 max|Δlogit| {row['max_logit_diff_last4']:.4f} "
                      f"(|logit|max {row['logit_absmax']:.2f})  greedy agree "
                      f"{row['greedy_prefix_agree']:2d}/{row['greedy_len']:2d}", flush=True)
        mine = [r for r in rows if r["format"] == fmt]
        if mine:
            print(f"summary {fmt}: {sum(r['greedy_prefix_agree'] == r['greedy_len'] for r in mine)}/{len(mine)} greedy "
                  f"identical; log-prob drift max {max(r['logprob_drift_max'] for r in mine):.4f}, worst mean "
                  f"{max(r['logprob_drift_mean'] for r in mine):.4f}; last4 max|Δlogit| "
                  f"{max(r['max_logit_diff_last4'] for r in mine):.4f}", flush=True)
    if args.json:
        machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
        args.json.write_text(json.dumps({"machine": machine, "torch": torch.__version__,
                                         "date": time.strftime("%Y-%m-%d"), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()

"""Measure how far bf16 inference and 8-bit expert weights drift from the float32 reference fixtures.

For every (config, case) in DSVL2_REFERENCE_DIR and every ``--formats`` entry it loads the fixture
checkpoint (``bf16``: every weight and activation in bfloat16; ``int8`` / ``fp8``: routed and
shared experts stored in 8 bits, everything else and the activations float32, so the figure is
the weight format's own error) on ``--device`` and prints, against the official float32 outputs:

* teacher-forced log-prob drift: |log p(next prompt token)| differences over every prompt
  position (``teacher_forced_logprobs``), max and mean;
* max |logit difference| over the last 4 prompt positions (``logits_last4``);
* greedy agreement: how many of the fixture's 16 greedy tokens are reproduced before the first
  difference (eager decode), and whether all are.

``bf16`` rows also carry the bf16 parity check of tools/parity/bf16_check.py (the model in
float64 with float32 storage, in float64, and in bf16 with routing held and free):

* ``held``: the routing-held bf16 error as a fraction of its bound 2^16 × the float32-storage
  error (RMS over every position and logit; ≤ 1 passes) and its largest |Δlogit|;
* ``free``: the free run's error before its first flip (causal: no flip reaches there) as a fraction
  of its bound (≤ 1 passes), the positions where some MoE layer changed its choice, the
  first-MoE-layer flips and the largest float32 margin among them against the margin bf16
  rounding can cross; top-1 agreement with float32 over every position, free and held.

The exit status is 1 when a bf16 case is outside its bounds. Figures depend on the device and,
on the CPU, on the processor's kernels (docs/correctness.md). ``--save DIR`` also writes each
case's bf16 reference runs (``<config>-<case>.pt``) for ``tools/parity/official_bf16_drift.py``.

    python -m tools.parity.measure_drift [--formats bf16,int8,fp8] [--device cpu|cuda] [--configs tiny]
        [--cases a,b] [--json out.json] [--save DIR]
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch

from deepseek_vl2.engine.generation import Generator
from deepseek_vl2.engine.sampling import SamplingParams
from deepseek_vl2.engine.scheduler import BatchScheduler
from deepseek_vl2.inputs.processor import DeepseekVL2Processor
from deepseek_vl2.model.checkpoint import load_model
from tools.parity.bf16_bounds import bf16_figures, bf16_problems, ratio_to_bound
from tools.parity.bf16_check import ReferenceRuns, bf16_runs, perturb_by_float32_rounding, reference_runs
from tools.parity.reference_data import (case_names, checkpoint_dir, config_names, expected_outputs, has_outputs,
                                         load_case_inputs)

# Format → (activation and storage dtype, the loader's expert format).
FORMATS = {"bf16": (torch.bfloat16, "none"), "int8": (torch.float32, "int8"), "fp8": (torch.float32, "fp8")}


def load_generator(config: str, fmt: str, device: str) -> Generator:
    """An eager generator of a fixture checkpoint in one of :data:`FORMATS`."""
    dtype, quantize = FORMATS[fmt]
    model = load_model(checkpoint_dir(config), device=device, dtype=dtype, quantize=quantize)
    return Generator(model, DeepseekVL2Processor.from_pretrained(checkpoint_dir(config)), compile=False)


def load_references(config: str, device: str) -> tuple[Any, Any]:
    """The float64 model and its copy perturbed by float32 rounding (the bf16 check's yardsticks)."""
    f64, perturbed = (load_model(checkpoint_dir(config), device=device, dtype=torch.float64) for _ in range(2))
    perturb_by_float32_rounding(perturbed)
    return f64, perturbed


def prompt_logits(gen: Generator, inputs) -> torch.Tensor:
    """Logits [T, V] of one uncached forward over the prompt, float32 on the CPU."""
    with torch.inference_mode():
        embeds = gen.model.embed_inputs(inputs.input_ids, inputs.images, inputs.images_seq_mask,
                                        inputs.images_spatial_crop)
        positions = torch.arange(embeds.shape[0], device=embeds.device).unsqueeze(0)
        return gen.model.forward_embeds(embeds.unsqueeze(0), positions)[0].float().cpu()


def measure(config: str, case: str, fmt: str, gen: Generator, references: Optional[tuple],
            save: Optional[Path]) -> dict:
    """Drift figures of one case against the fixture's float32 outputs (bf16: with the bf16 check's)."""
    expected, meta = expected_outputs(config, case)
    conversation, images = load_case_inputs(case)
    inputs = gen.processor.process(conversation, images, system_prompt="")
    row: dict[str, Any] = dict(format=fmt, config=config, case=case)
    if references is None:
        logits = prompt_logits(gen, inputs)
    else:
        reference: ReferenceRuns = reference_runs(*references, inputs)
        runs = bf16_runs(gen.model, inputs, reference)
        row.update(bf16_figures(runs))
        row["problems"] = bf16_problems(row)
        row["held_last4_diff"] = (runs.held[-4:] - expected["logits_last4"].double()).abs().max().item()
        logits = runs.free.float()  # the free run is the bf16 forward (bf16 values, exact in float32)
        if save is not None:
            torch.save(dict(f32=reference.f32, f64=reference.f64, routing=[ids.cpu() for ids in reference.routing]),
                       save / f"{config}-{case}.pt")
    ids = inputs.input_ids.cpu()
    logprobs = torch.log_softmax(logits[:-1], dim=-1).gather(1, ids[1:].unsqueeze(1)).squeeze(1)
    drift = (logprobs - expected["teacher_forced_logprobs"]).abs()
    reference_tokens = meta["greedy"]["new_tokens"]
    with BatchScheduler(gen) as scheduler:
        tokens = scheduler.run(inputs, SamplingParams(temperature=0.0, max_new_tokens=meta["greedy"]["n_new"],
                                                      stop=())).tokens
    row.update(logprob_drift_max=drift.max().item(), logprob_drift_mean=drift.mean().item(),
               logprob_positions=int(drift.numel()),
               max_logit_diff=(logits[-4:] - expected["logits_last4"]).abs().max().item(),
               logit_absmax=expected["logits_last4"].abs().max().item(),
               greedy_prefix_agree=next((i for i, (a, b) in enumerate(zip(reference_tokens, tokens)) if a != b),
                                        min(len(reference_tokens), len(tokens))),
               greedy_len=len(reference_tokens), identical=tokens == reference_tokens)
    return row


def print_row(row: dict) -> None:
    """One line per case and format; bf16 rows add the bf16 check's figures."""
    line = (f"{row['format']:5s} {row['config']:6s} {row['case']:16s} log-prob drift max "
            f"{row['logprob_drift_max']:.4f} mean {row['logprob_drift_mean']:.4f}  last4 max|Δlogit| "
            f"{row['max_logit_diff']:.4f} (|logit|max {row['logit_absmax']:.2f})  greedy agree "
            f"{row['greedy_prefix_agree']:2d}/{row['greedy_len']:2d}")
    if "problems" in row:
        flips = (f"1st-layer flips {row['first_layer_flips']:3d} at margin ≤ {row['flip_margin_max']:.3f} "
                 f"(allowed {row['flip_margin_allowed']:.3f})" if "first_layer_flips" in row else "no MoE layer")
        line += (f"\n      held {ratio_to_bound(row, 'held'):.2f} of bound (max|Δ| {row['held_max_abs']:.3f}, "
                 f"last4 {row['held_last4_diff']:.3f})  free {ratio_to_bound(row, 'free'):.2f} of bound over "
                 f"{row['free_prefix_positions']} positions, {row['positions_with_a_flip']:3d}/{row['positions']:4d} "
                 f"positions flipped, {flips}  top-1 {row['free_top1_agreement']:.3f}/{row['held_top1_agreement']:.3f}"
                 f"  {'FAIL' if row['problems'] else 'ok'}")
    print(line, flush=True)


def summarize(rows: list[dict]) -> dict:
    """One format's figures over its cases (bf16: with the bf16 check's)."""
    drift = sorted(r["max_logit_diff"] for r in rows)
    summary: dict[str, Any] = dict(
        cases=len(rows), identical=sum(r["identical"] for r in rows),
        greedy_agree=sum(r["greedy_prefix_agree"] for r in rows), greedy_tokens=sum(r["greedy_len"] for r in rows),
        logprob_drift_max=max(r["logprob_drift_max"] for r in rows),
        logprob_drift_mean_worst=max(r["logprob_drift_mean"] for r in rows),
        max_logit_diff=drift[-1], median_logit_diff=drift[len(drift) // 2])
    if "problems" in rows[0]:
        held = sorted(ratio_to_bound(r, "held") for r in rows)
        summary.update(failed=sum(bool(r["problems"]) for r in rows), held_ratio_max=held[-1],
                       held_ratio_median=held[len(held) // 2],
                       free_ratio_max=max(ratio_to_bound(r, "free") for r in rows),
                       free_top1_agreement_min=min(r["free_top1_agreement"] for r in rows),
                       held_top1_agreement_min=min(r["held_top1_agreement"] for r in rows))
    return summary


def print_summary(fmt: str, s: dict) -> None:
    """The summary line of one format."""
    line = (f"summary {fmt}: {s['identical']}/{s['cases']} greedy identical ({s['greedy_agree']}/{s['greedy_tokens']} "
            f"tokens before the first difference); log-prob drift max {s['logprob_drift_max']:.4f}, worst mean "
            f"{s['logprob_drift_mean_worst']:.4f}; last4 max|Δlogit| {s['max_logit_diff']:.4f} (median "
            f"{s['median_logit_diff']:.4f})")
    if "failed" in s:
        line += (f"\nsummary {fmt} check: {s['failed']}/{s['cases']} cases outside the bf16 bounds; routing held at "
                 f"{s['held_ratio_median']:.2f} (median) to {s['held_ratio_max']:.2f} of its bound; free run's "
                 f"flip-free prefix at most {s['free_ratio_max']:.2f} of its bound; top-1 agreement ≥ "
                 f"{s['free_top1_agreement_min']:.3f} free, ≥ {s['held_top1_agreement_min']:.3f} held")
    print(line, flush=True)


def main() -> None:
    """Measure every selected (config, format, case); print one line each and a summary per format."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--formats", default=",".join(FORMATS), help="comma-separated, of: " + ", ".join(FORMATS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--configs", help="comma-separated configs (default: all)")
    parser.add_argument("--cases", help="comma-separated cases (default: all)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--save", type=Path, help="write each case's bf16 reference runs here (official_bf16_drift.py)")
    args = parser.parse_args()
    formats = args.formats.split(",")
    if unknown := [fmt for fmt in formats if fmt not in FORMATS]:
        parser.error(f"unknown format(s) {', '.join(unknown)}; use {', '.join(FORMATS)}")
    if args.device.startswith("cuda"):  # the float32 yardstick must be float32, bf16 sums float32 (docs/correctness.md)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
    if args.save:
        args.save.mkdir(parents=True, exist_ok=True)
    cases = args.cases.split(",") if args.cases else case_names()
    rows: list[dict] = []
    started = time.perf_counter()
    for config in args.configs.split(",") if args.configs else config_names():
        for fmt in formats:
            gen = load_generator(config, fmt, args.device)
            references = load_references(config, args.device) if fmt == "bf16" else None
            for case in cases:
                if has_outputs(config, case):
                    rows.append(measure(config, case, fmt, gen, references, args.save))
                    print_row(rows[-1])
    summaries = {fmt: summarize(mine) for fmt in formats if (mine := [r for r in rows if r["format"] == fmt])}
    for fmt, summary in summaries.items():
        print_summary(fmt, summary)
    if args.json:
        machine = (torch.cuda.get_device_name(0) if args.device.startswith("cuda") else
                   f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
        args.json.write_text(json.dumps(dict(summary=summaries, rows=rows, device=args.device, machine=machine,
                                             seconds=round(time.perf_counter() - started, 1), torch=torch.__version__,
                                             date=time.strftime("%Y-%m-%d")), indent=1))
    sys.exit(1 if summaries.get("bf16", {}).get("failed") else 0)


if __name__ == "__main__":
    main()

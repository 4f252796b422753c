"""Measure how far bfloat16 inference drifts from float32 on the reference fixture cases.

For every (config, case) in DSVL2_REFERENCE_DIR it runs the bf16 parity check of
tools/parity/bf16_check.py on ``--device`` (the model in float64 with float32 storage, in float64, and
in bf16 with routing held and free) and prints, per case:

* ``held``: the routing-held bf16 error as a fraction of its bound 2^16 × the float32-storage
  error (RMS over every position and logit; ≤ 1 passes) and its largest |Δlogit|;
* ``free``: the free run's error before its first flip (causal: no flip reaches there) as a fraction of its
  bound (≤ 1 passes), the positions where some MoE layer changed its choice, the first-MoE-layer
  flips and the largest float32 margin among them against the margin bf16 rounding can cross;
* top-1 agreement with float32 over every position, free and held;
* the old figures: max |Δlogit| at the last 4 prompt positions against the official float32
  ``logits_last4`` (free and held), and how many of the 16 greedy tokens agree.

Figures depend on the device and, on the CPU, on the processor's kernels (docs/correctness.md).
``--save DIR`` also writes each case's reference runs (``<config>-<case>.pt``) for
``tools/parity/official_bf16_drift.py``, which checks the official code's bf16 runs the same way.

    python -m tools.parity.measure_bf16_drift [--device cpu|cuda] [--json out.json] [--configs tiny] [--cases a,b] [--save DIR]
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch


from tools.parity.bf16_bounds import bf16_figures, bf16_problems, ratio_to_bound  # noqa: E402
from tools.parity.bf16_check import bf16_runs, perturb_by_float32_rounding, reference_runs  # noqa: E402
from deepseek_vl2.engine.generation import Generator  # noqa: E402
from deepseek_vl2.engine.sampling import SamplingParams  # noqa: E402
from deepseek_vl2.engine.scheduler import BatchScheduler  # noqa: E402
from deepseek_vl2.inputs.processor import DeepseekVL2Processor  # noqa: E402
from deepseek_vl2.model.checkpoint import load_model  # noqa: E402
from tools.parity.reference_data import case_names, checkpoint_dir, config_names, expected_outputs, has_outputs, load_case_inputs  # noqa: E402


def measure(config: str, case: str, models: dict, gen: Generator, processor: DeepseekVL2Processor,
            save: Path | None) -> dict:
    """bf16 figures of one case: the parity check's, and the old ones against the fixture."""
    expected, meta = expected_outputs(config, case)
    conversation, images = load_case_inputs(case)
    inputs = processor.process(conversation, images, system_prompt="")
    reference = reference_runs(models["f64"], models["f64_perturbed"], inputs)
    runs = bf16_runs(gen.model, inputs, reference)
    row = dict(config=config, case=case, **bf16_figures(runs))
    row["problems"] = bf16_problems(row)
    last4 = expected["logits_last4"].to(torch.float64)
    row["max_logit_diff"] = (runs.free[-4:] - last4).abs().max().item()
    row["held_last4_diff"] = (runs.held[-4:] - last4).abs().max().item()
    reference_tokens = meta["greedy"]["new_tokens"]
    with BatchScheduler(gen) as scheduler:
        tokens = scheduler.run(inputs, SamplingParams(temperature=0.0, max_new_tokens=meta["greedy"]["n_new"],
                                                      stop=())).tokens
    row["greedy_prefix_agree"] = next((i for i, (a, b) in enumerate(zip(reference_tokens, tokens)) if a != b),
                                      min(len(reference_tokens), len(tokens)))
    row["greedy_len"] = len(reference_tokens)
    row["identical"] = tokens == reference_tokens
    if save is not None:
        torch.save(dict(f32=reference.f32, f64=reference.f64, routing=[ids.cpu() for ids in reference.routing]),
                   save / f"{config}-{case}.pt")
    return row


def print_row(row: dict) -> None:
    """One line per case."""
    flips = (f"1st-layer flips {row['first_layer_flips']:3d} at margin ≤ {row['flip_margin_max']:.3f} "
             f"(allowed {row['flip_margin_allowed']:.3f})" if "first_layer_flips" in row else "no MoE layer")
    print(f"{row['config']:6s} {row['case']:15s} held {ratio_to_bound(row, 'held'):.2f} of bound (max|Δ| {row['held_max_abs']:.3f})  "
          f"free {ratio_to_bound(row, 'free'):.2f} of bound over {row['free_prefix_positions']} positions, "
          f"{row['positions_with_a_flip']:3d}/{row['positions']:4d} positions flipped, {flips}  "
          f"top-1 {row['free_top1_agreement']:.3f}/{row['held_top1_agreement']:.3f}  "
          f"last-4 max|Δ| {row['max_logit_diff']:.3f}/{row['held_last4_diff']:.3f}  "
          f"greedy {row['greedy_prefix_agree']:2d}/{row['greedy_len']:2d}  {'FAIL' if row['problems'] else 'ok'}",
          flush=True)


def main() -> None:
    """Measure every selected (config, case); print one line each and a summary."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--configs", help="comma-separated configs (default: all)")
    parser.add_argument("--cases", help="comma-separated cases (default: all)")
    parser.add_argument("--save", type=Path, help="write each case's reference runs here (for official_bf16_drift.py)")
    args = parser.parse_args()
    if args.device.startswith("cuda"):  # the float32 yardstick must be float32, bf16 sums float32 (docs/correctness.md)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
    if args.save:
        args.save.mkdir(parents=True, exist_ok=True)
    configs = args.configs.split(",") if args.configs else config_names()
    cases = args.cases.split(",") if args.cases else case_names()
    rows = []
    started = time.perf_counter()
    for config in configs:
        processor = DeepseekVL2Processor.from_pretrained(checkpoint_dir(config))
        models = {"f64": load_model(checkpoint_dir(config), device=args.device, dtype=torch.float64),
                  "f64_perturbed": load_model(checkpoint_dir(config), device=args.device, dtype=torch.float64)}
        perturb_by_float32_rounding(models["f64_perturbed"])
        gen = Generator(load_model(checkpoint_dir(config), device=args.device, dtype=torch.bfloat16), processor,
                        compile=False)
        for case in cases:
            if has_outputs(config, case):
                rows.append(measure(config, case, models, gen, processor, args.save))
                print_row(rows[-1])
    held = sorted(ratio_to_bound(r, "held") for r in rows)
    free = sorted(ratio_to_bound(r, "free") for r in rows)
    drift = sorted(r["max_logit_diff"] for r in rows)
    summary = dict(
        cases=len(rows), failed=sum(bool(r["problems"]) for r in rows), held_ratio_max=held[-1],
        held_ratio_median=held[len(held) // 2], free_ratio_max=free[-1],
        free_top1_agreement_min=min(r["free_top1_agreement"] for r in rows),
        held_top1_agreement_min=min(r["held_top1_agreement"] for r in rows),
        identical=sum(r["identical"] for r in rows), max_logit_diff=drift[-1], median_logit_diff=drift[len(drift) // 2],
        device=args.device, seconds=round(time.perf_counter() - started, 1),
        machine=torch.cuda.get_device_name(0) if args.device.startswith("cuda") else
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        torch=torch.__version__, date=time.strftime("%Y-%m-%d"))
    print(f"summary: {summary['failed']}/{len(rows)} cases outside the bf16 bounds; routing held at "
          f"{summary['held_ratio_median']:.2f} (median) to {summary['held_ratio_max']:.2f} of its bound; free run's flip-free prefix at "
          f"most {summary['free_ratio_max']:.2f} of its bound; top-1 agreement ≥ "
          f"{summary['free_top1_agreement_min']:.3f} free, ≥ {summary['held_top1_agreement_min']:.3f} held; last-4 max|Δlogit| "
          f"{summary['max_logit_diff']:.3f} (median {summary['median_logit_diff']:.3f}); {summary['identical']}/{len(rows)} "
          f"greedy continuations identical")
    if args.json:
        args.json.write_text(json.dumps({"summary": summary, "rows": rows}, indent=1))
    sys.exit(1 if summary["failed"] else 0)


if __name__ == "__main__":
    main()

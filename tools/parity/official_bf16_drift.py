"""The official DeepSeek-VL2 code's own bf16 drift, checked with the same bounds as ours.

Runs in the official code's environment (transformers 4.38.2 & co., as the shared official-code notes describe),
never in ours: the official package is imported from DSVL2_OFFICIAL at run time and nothing of
it is stored here. It reads the reference runs that ``tools/parity/measure_drift.py --formats bf16 --save DIR``
wrote (our float32-storage and float64 logits and the float32 expert choice, per case), loads
each fixture checkpoint into the official model in bfloat16, and runs it twice per case: free,
and with every MoE gate's choice replaced by the saved float32 choice (weights from the gate's
own scores at those ids, normalised and scaled as the official gate does). It prints the same
figures as measure_drift.py (bound 3 needs our gate's margins and is left out).

    PYTHONPATH=<official packages>:<stand-ins> DSVL2_OFFICIAL=<official checkout> \\
        python -m tools.parity.official_bf16_drift DIR [--json out.json] [--device cpu]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bf16_bounds import Bf16Runs, bf16_figures, bf16_problems, ratio_to_bound  # noqa: E402  (torch only: no package of ours)
from tools.parity.reference_data import checkpoint_dir, expected_outputs, expected_processor_tensors, expected_tiles  # noqa: E402


class GateReplay:
    """Wraps the official MoEGate.forward: records each call's ids and, when ``forced`` is set,
    replaces them, recomputing the weights from the gate's own scores as the official gate does."""

    def __init__(self, gate_class: type) -> None:
        self.gate_class, self.original = gate_class, gate_class.forward
        self.forced: list[torch.Tensor] | None = None
        self.chosen: list[torch.Tensor] = []
        replay = self

        def forward(gate, hidden_states):
            ids, weights, aux = replay.original(gate, hidden_states)
            if replay.forced is not None:
                ids = replay.forced[len(replay.chosen)].to(ids.device)
                logits = F.linear(hidden_states.reshape(-1, hidden_states.shape[-1]).float(), gate.weight.float())
                scores = logits.softmax(dim=-1) if gate.scoring_func == "softmax" else logits.sigmoid()
                weights = scores.gather(1, ids)
                if gate.top_k > 1 and gate.norm_topk_prob:
                    weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
                weights = weights * gate.routed_scaling_factor
            replay.chosen.append(ids.detach().cpu())
            return ids, weights, aux

        gate_class.forward = forward

    def start(self, forced: list[torch.Tensor] | None) -> None:
        """Begin one forward pass (replaying ``forced`` when given)."""
        self.forced, self.chosen = forced, []


@torch.inference_mode()
def official_logits(model, case: str, device: str) -> torch.Tensor:
    """Logits [T, V] (float64, CPU) of one uncached official forward over the fixture's prompt."""
    tensors = expected_processor_tensors(case)
    crop = tensors["images_spatial_crop"]
    images = expected_tiles(case).to(device=device, dtype=torch.bfloat16).unsqueeze(0)
    embeds = model.prepare_inputs_embeds(
        input_ids=tensors["input_ids"].unsqueeze(0).to(device), images=images,
        images_seq_mask=tensors["images_seq_mask"].unsqueeze(0).to(device),
        images_spatial_crop=crop.unsqueeze(0).to(device))
    out = model.language(inputs_embeds=embeds, attention_mask=tensors["attention_mask"].unsqueeze(0).to(device))
    return out.logits[0].to(device="cpu", dtype=torch.float64)


def main() -> None:
    """Check every saved case with the official bf16 model; one line each and a summary."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("saved", type=Path, help="folder written by measure_drift.py --save")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    sys.path.insert(0, os.environ["DSVL2_OFFICIAL"])
    from deepseek_vl2.models import DeepseekVLV2ForCausalLM
    from deepseek_vl2.models.modeling_deepseek import MoEGate

    replay = GateReplay(MoEGate)
    rows, models = [], {}
    for path in sorted(args.saved.glob("*.pt")):
        config, case = path.stem.split("-", 1)
        if config not in models:
            models[config] = DeepseekVLV2ForCausalLM.from_pretrained(
                str(checkpoint_dir(config)), torch_dtype=torch.bfloat16).to(args.device).eval()
        saved = torch.load(path)
        replay.start(saved["routing"])
        held = official_logits(models[config], case, args.device)
        replay.start(None)
        free = official_logits(models[config], case, args.device)
        runs = Bf16Runs(saved["f32"], saved["f64"], held, free, None, None, None, saved["routing"], replay.chosen)
        row = dict(config=config, case=case, **bf16_figures(runs))
        row["problems"] = bf16_problems(row)
        last4 = expected_outputs(config, case)[0]["logits_last4"].to(torch.float64)
        row["max_logit_diff"] = (free[-4:] - last4).abs().max().item()
        row["held_last4_diff"] = (held[-4:] - last4).abs().max().item()
        rows.append(row)
        print(f"{config:6s} {case:15s} held {ratio_to_bound(row, 'held'):.2f} of bound (max|Δ| {row['held_max_abs']:.3f})  "
              f"free {ratio_to_bound(row, 'free'):.2f} of bound over {row['free_prefix_positions']} positions, "
              f"{row['positions_with_a_flip']:3d}/{row['positions']:4d} positions flipped  "
              f"top-1 {row['free_top1_agreement']:.3f}/{row['held_top1_agreement']:.3f}  "
              f"last-4 max|Δ| {row['max_logit_diff']:.3f}/{row['held_last4_diff']:.3f}  "
              f"{'FAIL' if row['problems'] else 'ok'}", flush=True)
    drift = sorted(r["max_logit_diff"] for r in rows)
    summary = dict(cases=len(rows), failed=sum(bool(r["problems"]) for r in rows),
                   held_ratio_max=max(ratio_to_bound(r, "held") for r in rows),
                   free_ratio_max=max(ratio_to_bound(r, "free") for r in rows),
                   max_logit_diff=drift[-1], median_logit_diff=drift[len(drift) // 2], torch=torch.__version__)
    print("summary:", json.dumps(summary))
    if args.json:
        args.json.write_text(json.dumps({"summary": summary, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()

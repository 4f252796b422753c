"""The three bounds of the bf16 parity check, on tensors only (no model code imported, so the
official code's runs can be checked with them too). tools/parity/bf16_check.py runs the model and says
where the bounds come from; docs/correctness.md derives them."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

U_BF16 = 2.0**-8  # unit roundoff of bfloat16 (8 significant bits, round to nearest)
U_F32 = 2.0**-24  # unit roundoff of float32 (24 significant bits)
PRECISION_RATIO = U_BF16 / U_F32  # 2^16: how much larger a bf16 rounding error is than a float32 one
# A routing margin is a difference of two scores, and (group-limited routing) a group score is a
# sum of two: a margin moves by at most 4 times the largest score error.
MARGIN_PER_SCORE_ERROR = 4.0


@dataclass
class GateRecord:
    """The first MoE layer's gate: scores [N, E] float64 on the CPU, ids [N, k], margins [N]."""

    scores: torch.Tensor
    ids: torch.Tensor
    margin: torch.Tensor


@dataclass
class Bf16Runs:
    """Logits [T, V] (float64, CPU) of the four runs of one prompt and their first-MoE-layer gates
    (None for a model without MoE layers)."""

    f32: torch.Tensor
    f64: torch.Tensor
    held: torch.Tensor
    free: torch.Tensor
    gate_f32: Optional[GateRecord]
    gate_f64: Optional[GateRecord]
    gate_free: Optional[GateRecord]
    routing_f32: list[torch.Tensor]
    routing_free: list[torch.Tensor]


def _rms(x: torch.Tensor, dim: Optional[int] = None) -> torch.Tensor:
    return x.pow(2).mean().sqrt() if dim is None else x.pow(2).mean(dim).sqrt()


def _changed(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per token [N]: whether two id sets [N, k] differ (order ignored)."""
    return (a.sort(dim=-1).values != b.sort(dim=-1).values).any(dim=-1)


def bf16_figures(runs: Bf16Runs) -> dict[str, Any]:
    """The figures the three bounds compare, and the free run's agreement with float32.

    ``held_ratio`` ≤ 1 is bound 1 (RMS over all positions and logits); ``free_median_relative``
    ≤ ``free_median_bound`` is bound 2 (per position: RMS over the vocabulary relative to the
    logits' RMS, median over the positions where no MoE layer changed its choice);
    ``flip_margin_max`` ≤ ``flip_margin_allowed`` is bound 3 (first MoE layer)."""
    reference = runs.f64
    float32_error = _rms(runs.f32 - reference)
    held_error = _rms(runs.held - reference)
    position_scale = _rms(reference, dim=-1)  # [T] each position's logit RMS
    float32_relative = _rms(runs.f32 - reference, dim=-1) / position_scale
    free_relative = _rms(runs.free - reference, dim=-1) / position_scale
    flipped = torch.zeros(reference.shape[0], dtype=torch.bool)
    for ours, theirs in zip(runs.routing_f32, runs.routing_free):
        flipped |= _changed(ours.cpu(), theirs.cpu())
    unflipped = ~flipped if (~flipped).any() else flipped  # every position flipped: use them all
    figures: dict[str, Any] = dict(
        positions=reference.shape[0],
        logit_rms=_rms(reference).item(),
        float32_error_rms=float32_error.item(),
        held_error_rms=held_error.item(),
        held_ratio=(held_error / (PRECISION_RATIO * float32_error)).item(),
        held_max_abs=(runs.held - reference).abs().max().item(),
        free_median_relative=free_relative[unflipped].median().item(),
        free_median_bound=(PRECISION_RATIO * float32_relative[unflipped].median()).item(),
        free_max_abs=(runs.free - reference).abs().max().item(),
        free_top1_agreement=(runs.free.argmax(-1) == runs.f32.argmax(-1)).double().mean().item(),
        held_top1_agreement=(runs.held.argmax(-1) == runs.f32.argmax(-1)).double().mean().item(),
        positions_with_a_flip=int(flipped.sum()),
    )
    if runs.gate_f32 is not None:
        score_error = (runs.gate_f32.scores - runs.gate_f64.scores).abs().max().item()
        tolerance = MARGIN_PER_SCORE_ERROR * PRECISION_RATIO * score_error
        first_flips = _changed(runs.gate_f32.ids, runs.gate_free.ids)
        margins = runs.gate_f32.margin[first_flips]
        figures.update(first_layer_flips=int(first_flips.sum()), first_layer_tokens=int(first_flips.numel()),
                       flip_margin_max=margins.max().item() if margins.numel() else 0.0,
                       flip_margin_allowed=tolerance)
    return figures


def bf16_problems(figures: dict[str, Any]) -> list[str]:
    """Why a bf16 run is not explained by bf16 rounding and routing flips; empty when it is."""
    problems = []
    if figures["held_ratio"] > 1.0:
        problems.append(
            f"with routing held, the bf16 logit error (RMS {figures['held_error_rms']:.3g}) is "
            f"{figures['held_ratio']:.2f}x 2^16 times the float32 rounding error (RMS {figures['float32_error_rms']:.3g}): "
            "more than bf16 arithmetic explains")
    if figures["free_median_relative"] > figures["free_median_bound"]:
        problems.append(
            f"free bf16 run: at the median position where no expert choice changed, the relative logit error "
            f"{figures['free_median_relative']:.3g} exceeds 2^16 times float32's ({figures['free_median_bound']:.3g})")
    if figures.get("flip_margin_max", 0.0) > figures.get("flip_margin_allowed", 0.0):
        problems.append(
            f"free bf16 run: {figures['first_layer_flips']} of {figures['first_layer_tokens']} tokens change experts in the "
            f"first MoE layer, one at a float32 routing margin of {figures['flip_margin_max']:.3g}, more than bf16 "
            f"rounding of the scores can move it ({figures['flip_margin_allowed']:.3g})")
    return problems

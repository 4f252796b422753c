"""The three bounds of the bf16 parity check, on tensors only (no model code imported, so the
official code's runs can be checked with them too). tools/parity/bf16_check.py runs the model and says
where the bounds come from; docs/correctness.md derives them and their margin."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch

U_BF16 = 2.0**-8  # unit roundoff of bfloat16 (8 significant bits, round to nearest)
U_F32 = 2.0**-24  # unit roundoff of float32 (24 significant bits)
PRECISION_RATIO = U_BF16 / U_F32  # 2^16: how much larger a bf16 rounding error is than a float32 one
# A routing margin is a difference of two scores, and (group-limited routing) a group score is a
# sum of two: a margin moves by at most 4 times the largest score error.
MARGIN_PER_SCORE_ERROR = 4.0
# Bounds 1 and 2 compare two realized RMS errors whose ratio is ≤ 1 in expectation; a correct run
# exceeds 1 by sampling noise alone. The margin is this many standard errors of log(ratio), the
# standard error estimated from the float32 run's own spread over blocks of consecutive positions
# (one-sided: a correct run fails with probability ≈ 0.13 % under a normal approximation).
MARGIN_STANDARD_ERRORS = 3.0
POSITIONS_PER_BLOCK = 8  # neighbouring positions share errors (attention, image tiles): blocks absorb that
MIN_BLOCKS = 30  # fewer blocks estimate the spread too loosely: single positions then
MIN_POSITIONS = 8  # below this a ratio of two RMS errors says nothing: the bound is not checked


@dataclass
class GateRecord:
    """The first MoE layer's gate: scores [N, E] float64 on the CPU, ids [N, k], margins [N]."""

    scores: torch.Tensor
    ids: torch.Tensor
    margin: torch.Tensor


@dataclass
class Bf16Runs:
    """Logits [T, V] (float64, CPU) of the four runs of one prompt and their first-MoE-layer gates
    (None for a model without MoE layers). The logits' rows are positions ``first_position`` on of
    the sequence the routings [first_position + T or more, k] cover: a run that reused cached KV
    computed logits only after it, and a flip in the reused part reaches every row."""

    f32: torch.Tensor
    f64: torch.Tensor
    held: torch.Tensor
    free: torch.Tensor
    gate_f32: Optional[GateRecord]
    gate_f64: Optional[GateRecord]
    gate_free: Optional[GateRecord]
    routing_f32: list[torch.Tensor]
    routing_free: list[torch.Tensor]
    first_position: int = 0


def _rms(x: torch.Tensor) -> torch.Tensor:
    return x.pow(2).mean().sqrt()


def _changed(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per token [N]: whether two id sets [N, k] differ (order ignored)."""
    return (a.sort(dim=-1).values != b.sort(dim=-1).values).any(dim=-1)


def _student_t_quantile(z: float, degrees: int) -> float:
    """The Student t quantile matching the standard normal one ``z`` (Cornish–Fisher, two terms;
    within a few % from 10 degrees of freedom on)."""
    return z + (z**3 + z) / (4 * degrees) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * degrees**2)


def noise_allowance(yardstick_sq: torch.Tensor) -> float:
    """The factor a correct run's RMS ratio may exceed 1 by through sampling noise alone.

    ``yardstick_sq`` [N]: each position's squared float32 error. Under the hypothesis tested, the
    bf16 run's squared errors are an independent draw with the same relative spread over
    positions, scaled by at most 2^32; the ratio R = √(Σ bf16 / Σ yardstick) then has
    Var(log R) ≈ ¼ · 2 · Var(Y_b / mean Y) / B over B samples Y_b (delta method, ratio
    estimator): blocks of consecutive positions where there are enough of them, else single
    positions; Student t for the estimated spread. The spread comes from the float32 run alone,
    so a bug cannot widen its own margin. Infinite (nothing to check) below MIN_POSITIONS."""
    positions = yardstick_sq.numel()
    if positions < MIN_POSITIONS:
        return math.inf
    blocks = positions // POSITIONS_PER_BLOCK
    if blocks < MIN_BLOCKS:
        blocks = positions
    sums = torch.stack([chunk.sum() for chunk in yardstick_sq.tensor_split(blocks)])  # sizes differ by ≤ 1
    relative = sums / sums.mean() - 1
    log_ratio_se = 0.5 * math.sqrt(2 * relative.pow(2).sum().item() / (blocks * (blocks - 1)))
    return math.exp(_student_t_quantile(MARGIN_STANDARD_ERRORS, blocks - 1) * log_ratio_se)


def bf16_figures(runs: Bf16Runs) -> dict[str, Any]:
    """The figures the three bounds compare, and the free run's agreement with float32.

    Bound 1: ``held_ratio`` = RMS(held − f64) / (2^16 · RMS(f32 − f64)) over every position and
    logit, ≤ ``held_allowed`` (:func:`noise_allowance`). Bound 2: ``free_ratio``, the same ratio
    for the free run over the ``free_prefix_positions`` before the first position where some MoE
    layer changed its choice (causal attention: no flip reaches them), ≤ ``free_allowed``.
    Bound 3: ``flip_margin_max`` ≤ ``flip_margin_allowed`` (first MoE layer)."""
    reference = runs.f64
    float32_sq = (runs.f32 - reference).pow(2).sum(-1)  # [T] each position's squared float32 error
    held_sq = (runs.held - reference).pow(2).sum(-1)
    free_sq = (runs.free - reference).pow(2).sum(-1)
    end = runs.first_position + reference.shape[0]
    flipped = torch.zeros(end, dtype=torch.bool)
    for ours, theirs in zip(runs.routing_f32, runs.routing_free):
        flipped |= _changed(ours[:end].cpu(), theirs[:end].cpu())
    first_flip = int(flipped.nonzero()[0, 0]) if flipped.any() else end
    prefix = max(0, first_flip - runs.first_position)
    figures: dict[str, Any] = dict(
        positions=reference.shape[0],
        logit_rms=_rms(reference).item(),
        float32_error_rms=_rms(runs.f32 - reference).item(),
        held_error_rms=_rms(runs.held - reference).item(),
        held_ratio=math.sqrt(held_sq.sum() / float32_sq.sum()) / PRECISION_RATIO,
        held_allowed=noise_allowance(float32_sq),
        held_max_abs=(runs.held - reference).abs().max().item(),
        free_prefix_positions=prefix,
        free_ratio=(math.sqrt(free_sq[:prefix].sum() / float32_sq[:prefix].sum()) / PRECISION_RATIO
                    if prefix else 0.0),
        free_allowed=noise_allowance(float32_sq[:prefix]),
        free_max_abs=(runs.free - reference).abs().max().item(),
        free_top1_agreement=(runs.free.argmax(-1) == runs.f32.argmax(-1)).double().mean().item(),
        held_top1_agreement=(runs.held.argmax(-1) == runs.f32.argmax(-1)).double().mean().item(),
        positions_with_a_flip=int(flipped[runs.first_position:].sum()),
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


def ratio_to_bound(figures: dict[str, Any], bound: str) -> float:
    """``"held"`` (bound 1) or ``"free"`` (bound 2): the ratio as a fraction of what is allowed
    (> 1 fails; 0 where the free run has no position before its first flip)."""
    return figures[f"{bound}_ratio"] / figures[f"{bound}_allowed"]


def bf16_problems(figures: dict[str, Any]) -> list[str]:
    """Why a bf16 run is not explained by bf16 rounding and routing flips; empty when it is."""
    problems = []
    if figures["held_ratio"] > figures["held_allowed"]:
        problems.append(
            f"with routing held, the bf16 logit error (RMS {figures['held_error_rms']:.3g}) is "
            f"{figures['held_ratio']:.3f}x 2^16 times the float32 rounding error (RMS {figures['float32_error_rms']:.3g}), "
            f"more than bf16 arithmetic explains (allowed {figures['held_allowed']:.3f}x with sampling noise)")
    if figures["free_ratio"] > figures["free_allowed"]:
        problems.append(
            f"free bf16 run: over the {figures['free_prefix_positions']} positions before the first changed expert "
            f"choice, the logit error is {figures['free_ratio']:.3f}x 2^16 times float32's "
            f"(allowed {figures['free_allowed']:.3f}x with sampling noise)")
    if figures.get("flip_margin_max", 0.0) > figures.get("flip_margin_allowed", 0.0):
        problems.append(
            f"free bf16 run: {figures['first_layer_flips']} of {figures['first_layer_tokens']} tokens change experts in the "
            f"first MoE layer, one at a float32 routing margin of {figures['flip_margin_max']:.3g}, more than bf16 "
            f"rounding of the scores can move it ({figures['flip_margin_allowed']:.3g})")
    return problems

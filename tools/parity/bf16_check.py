"""The bfloat16 parity check: bounds derived from the unit roundoffs, not fitted to any fixture.

A bf16 run differs from float32 for two reasons: bf16 arithmetic (every stored tensor rounded
to 8 significant bits), and MoE routing flips (a near-tied expert choice that rounds the other
way and moves that token by order 1 — the official code flips the same way). The check keeps
them apart by running the model four times on one prompt, each an uncached forward:

* ``f32``: the float64 model with every floating result rounded to float32
  (:class:`Float32Storage`): float32 storage, exact arithmetic — it records the expert choices;
* ``f64``: float64 with that choice replayed, its weights and input tiles each perturbed by a
  float32 rounding (relative ±2^-24), so that ``f32 − f64`` is the error of storing every value
  of this checkpoint's computation, weights included, in float32;
* ``held``: bfloat16 with the f32 choice replayed (routing held): bf16 arithmetic alone;
* ``free``: bfloat16 choosing its own experts, as a user's run does.

Bounds (docs/correctness.md derives them):

1. Routing held, RMS over every position and logit: ``|held − f64| ≤ 2^16 · |f32 − f64|``
   in expectation. To first order a run's error is Σ_sites J_s·(rounding error at s), each
   rounding error a fraction ≤ u of the value it rounds, independent of the others, so its
   variance scales with u². A correct bf16 run (float32 accumulation, float32 norms, softmax,
   gate and rope angles) rounds at a subset of the sites where ``f32`` rounds (every result of
   every torch call), with u_bf16 / u_f32 = 2^-8 / 2^-24 = 2^16 times larger roundings. The two
   realized errors scatter around their expectations: the check allows 3 standard errors of
   their ratio, estimated from the float32 run's spread over positions
   (:func:`bf16_bounds.noise_allowance`).
2. Free run, over the positions before the first one where some MoE layer changed its choice:
   the same bound. Attention is causal, so no flip reaches them and the free run does the held
   run's arithmetic there; after a flip, the flipped token moves its successors by order 1.
3. Free run, first MoE layer: every token whose expert choice differs from ``f32`` sits at a
   routing margin ≤ 4 · 2^16 · max|scores_f32 − scores_f64| there. Before the first MoE layer
   nothing has flipped, so a choice can only change where bf16 arithmetic moves the scores by
   more than the margin; a margin is a difference of two (group) scores, a group score a sum of
   two, hence 4 times the largest score error.

A bug that exists only in bf16 (a rope or position computed in the wrong dtype, a bad cast, a
wrong weight) adds error the float32 yardstick does not have and breaks bound 1 or 2
(tests/parity/test_bf16_check.py injects such bugs); one whose effect stays below bf16's own rounding
noise (a norm's statistics in bf16) cannot be seen by any bound and does no harm.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch.overrides import TorchFunctionMode

from deepseek_vl2.inputs.processor import ProcessedInputs
from deepseek_vl2.model.moe import Gate, Routing
from deepseek_vl2.model.multimodal import DeepseekVL2

from tools.parity.bf16_bounds import U_F32, Bf16Runs, GateRecord

FLOAT32_ROUNDING_SEED = 0  # seed of the f64 run's float32-rounding perturbation (any seed will do)


def gate_margin(gate: Gate, scores: torch.Tensor) -> torch.Tensor:
    """Per token [N]: the smallest gap on which the gate's choice rests — last chosen minus first
    rejected expert score and, for group-limited routing, last kept minus first dropped group."""
    k = gate.top_k
    choice = scores
    if gate.method == "noaux_tc":
        choice = scores + gate.e_score_correction_bias.to(scores.dtype)
    margins = []
    if gate.method != "greedy" and gate.n_group > gate.topk_group:
        grouped = choice.view(choice.shape[0], gate.n_group, -1)
        group_score = grouped.topk(2, dim=-1).values.sum(-1) if gate.method == "noaux_tc" else grouped.amax(-1)
        best = group_score.topk(gate.topk_group + 1, dim=-1).values
        margins.append(best[:, gate.topk_group - 1] - best[:, gate.topk_group])
        choice = gate._keep_groups(choice, group_score)
    top = choice.topk(k + 1, dim=-1).values
    margins.append(top[:, k - 1] - top[:, k])
    return torch.stack(margins).amin(dim=0)


def _round_to_float32(value: Any) -> Any:
    """float64 tensors (also inside tuples and lists) rounded to float32 values, kept as float64."""
    if isinstance(value, torch.Tensor) and value.dtype == torch.float64:
        return value.to(torch.float32).to(torch.float64)
    if isinstance(value, (tuple, list)):
        return type(value)([_round_to_float32(v) for v in value])  # also torch.return_types
    return value


class Float32Storage(TorchFunctionMode):
    """Inside it, a float64 model computes as if every value it stores were float32: the result of
    every torch function and tensor method is rounded to float32, the arithmetic inside one call
    (a matmul's sum, a softmax) stays float64."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: D105
        return _round_to_float32(func(*args, **(kwargs or {})))


def perturb_by_float32_rounding(model: DeepseekVL2, seed: int = FLOAT32_ROUNDING_SEED) -> None:
    """Multiply every parameter (in place) by 1 + U_F32·r, r uniform in [-1, 1]: the weights then
    differ from the float32 checkpoint as a float32 rounding of exact weights would."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            noise = (2 * torch.rand(parameter.shape, generator=generator, dtype=torch.float64) - 1) * U_F32
            parameter.mul_(1 + noise.to(device=parameter.device, dtype=parameter.dtype))


def _forward(model: DeepseekVL2, inputs: ProcessedInputs, routing: Routing,
             images: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, Optional[GateRecord]]:
    """Logits [T, V] of one uncached forward (float64, CPU) and the first MoE gate's record."""
    gates = [m for m in model.modules() if isinstance(m, Gate)]
    seen: list[GateRecord] = []

    def record(gate: Gate, args: tuple, output: tuple) -> None:
        if not seen:
            scores = gate.scores(args[0]).to(torch.float64)
            seen.append(GateRecord(scores.cpu(), output[1].cpu(), gate_margin(gate, scores).cpu()))

    hook = gates[0].register_forward_hook(record) if gates else None
    try:
        with torch.inference_mode():
            embeds = model.embed_inputs(inputs.input_ids, inputs.images if images is None else images,
                                        inputs.images_seq_mask, inputs.images_spatial_crop)
            positions = torch.arange(embeds.shape[0], device=embeds.device).unsqueeze(0)
            logits = model.forward_embeds(embeds.unsqueeze(0), positions, routing=routing)[0]
    finally:
        if hook is not None:
            hook.remove()
    return logits.to(device="cpu", dtype=torch.float64), (seen[0] if seen else None)


@dataclass
class ReferenceRuns:
    """The two runs a bf16 run is compared with (they do not depend on the bf16 model)."""

    f32: torch.Tensor  # [T, V] logits of the float32-storage run
    f64: torch.Tensor  # [T, V] logits of the perturbed float64 run, routing replayed
    gate_f32: Optional[GateRecord]
    gate_f64: Optional[GateRecord]
    routing: list[torch.Tensor]  # the float32-storage run's expert ids per MoE layer


def reference_runs(f64: DeepseekVL2, f64_perturbed: DeepseekVL2, inputs: ProcessedInputs) -> ReferenceRuns:
    """The float32-storage run (on ``f64``, the float64 model; it chooses the experts) and the
    float64 run (on ``f64_perturbed``, after :func:`perturb_by_float32_rounding`) replaying its
    choice, with the input tiles perturbed the same way."""
    recorded = Routing()
    with Float32Storage():
        logits_f32, gate_f32 = _forward(f64, inputs, recorded)
    images = inputs.images
    if images is not None:
        generator = torch.Generator().manual_seed(FLOAT32_ROUNDING_SEED + 1)
        noise = (2 * torch.rand(images.shape, generator=generator, dtype=torch.float64) - 1) * U_F32
        images = images.to(torch.float64) * (1 + noise)
    logits_f64, gate_f64 = _forward(f64_perturbed, inputs, Routing(forced=recorded.chosen), images)
    return ReferenceRuns(logits_f32, logits_f64, gate_f32, gate_f64, recorded.chosen)


def bf16_runs(bf16: DeepseekVL2, inputs: ProcessedInputs, reference: ReferenceRuns) -> Bf16Runs:
    """The bf16 model's two runs — routing held to the reference's choice, and free — with the
    reference runs, ready for :func:`bf16_bounds.bf16_figures`."""
    held, _ = _forward(bf16, inputs, Routing(forced=reference.routing))
    chosen = Routing()
    free, gate_free = _forward(bf16, inputs, chosen)
    return Bf16Runs(reference.f32, reference.f64, held, free, reference.gate_f32, reference.gate_f64, gate_free,
                    [ids.cpu() for ids in reference.routing], [ids.cpu() for ids in chosen.chosen])

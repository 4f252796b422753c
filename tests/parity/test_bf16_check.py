"""The bf16 parity check fails when a bf16-only bug is introduced, and passes the model as it is.

Each bug is injected with pytest's monkeypatch (or on a private copy of the bf16 model) and
exists only in bfloat16: the float32 and float64 runs the check compares with are unaffected.
The prompt is the shared fixtures' ``small_200x150`` (433 positions: past 256, where bf16 stops
representing every integer) on the ``tiny`` checkpoint.
"""
from __future__ import annotations

import functools

import pytest
import torch

from tools.parity.bf16_bounds import bf16_figures, bf16_problems
from tools.parity.bf16_check import ReferenceRuns, bf16_runs, perturb_by_float32_rounding, reference_runs
from tools.parity.reference_data import case_names, checkpoint_dir, config_names, load_case_inputs, requires_reference
from deepseek_vl2.inputs.processor import DeepseekVL2Processor, ProcessedInputs
from deepseek_vl2.model import rope
from deepseek_vl2.model.checkpoint import load_model
from deepseek_vl2.model.multimodal import DeepseekVL2

CONFIG, CASE = "tiny", "small_200x150"
pytestmark = [
    requires_reference,
    pytest.mark.skipif(CONFIG not in config_names() or CASE not in case_names(),
                       reason=f"the fixtures have no {CONFIG}/{CASE}"),
]


@functools.lru_cache(maxsize=None)
def _prompt_and_reference() -> tuple[ProcessedInputs, ReferenceRuns]:
    conversation, images = load_case_inputs(CASE)
    inputs = DeepseekVL2Processor.from_pretrained(checkpoint_dir(CONFIG)).process(conversation, images, system_prompt="")
    exact = load_model(checkpoint_dir(CONFIG), device="cpu", dtype=torch.float64)
    perturbed = load_model(checkpoint_dir(CONFIG), device="cpu", dtype=torch.float64)
    perturb_by_float32_rounding(perturbed)
    return inputs, reference_runs(exact, perturbed, inputs)


def _bf16_model() -> DeepseekVL2:
    return load_model(checkpoint_dir(CONFIG), device="cpu", dtype=torch.bfloat16)


def _problems(model: DeepseekVL2) -> list[str]:
    inputs, reference = _prompt_and_reference()
    return bf16_problems(bf16_figures(bf16_runs(model, inputs, reference)))


def test_the_model_as_it_is_passes() -> None:
    assert _problems(_bf16_model()) == []


def test_rope_angles_in_bf16_fail(monkeypatch: pytest.MonkeyPatch) -> None:
    """The rotary angles (position × inverse frequency) computed in the model's dtype instead of
    float32: exact in float32 and float64, off by up to a few radians in bf16 past position 256."""

    def angles_in_model_dtype(self, positions: torch.Tensor, dtype: torch.dtype):
        freqs = positions.to(dtype).unsqueeze(-1) * self.inv_freq.to(positions.device, dtype)
        angles = torch.cat((freqs, freqs), dim=-1)
        return (angles.cos() * self.magnitude).to(dtype), (angles.sin() * self.magnitude).to(dtype)

    monkeypatch.setattr(rope.RotaryEmbedding, "cos_sin", angles_in_model_dtype)
    problems = _problems(_bf16_model())
    assert any("routing held" in p for p in problems), problems


def test_positions_cast_to_bf16_fail(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bad cast: the position ids pass through the model's dtype (rounded to even numbers past
    256), which moves both the rotary angles and the causal mask."""
    forward_embeds = DeepseekVL2.forward_embeds

    def positions_through_model_dtype(self, embeds, positions, *args, **kwargs):
        return forward_embeds(self, embeds, positions.to(self.dtype).to(positions.dtype), *args, **kwargs)

    monkeypatch.setattr(DeepseekVL2, "forward_embeds", positions_through_model_dtype)
    problems = _problems(_bf16_model())
    assert any("routing held" in p for p in problems), problems


def test_a_wrong_bf16_weight_fails() -> None:
    """A wrong weight: the bf16 copy of the LM head scaled by 1 + 2^-6 (a conversion that got one
    tensor's scale wrong by 1.6 %, about two bf16 steps)."""
    model = _bf16_model()
    with torch.no_grad():
        model.language.lm_head.weight.mul_(1 + 2.0**-6)
    problems = _problems(model)
    assert any("routing held" in p for p in problems), problems

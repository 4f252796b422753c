"""The bf16 parity check fails when a bf16-only bug is introduced, and passes the model as it is.

Each bug (tools/parity/bf16_bugs.py) is injected into the bf16 model only: the float32 and float64
runs the check compares with are unaffected.
The prompt is the shared fixtures' ``small_200x150`` (433 positions: past 256, where bf16 stops
representing every integer) on the ``tiny`` checkpoint.
"""
from __future__ import annotations

import functools

import pytest
import torch

from tools.parity.bf16_bounds import bf16_figures, bf16_problems
from tools.parity.bf16_bugs import BF16_BUGS
from tools.parity.bf16_check import ReferenceRuns, bf16_runs, perturb_by_float32_rounding, reference_runs
from tools.parity.reference_data import case_names, checkpoint_dir, config_names, load_case_inputs, requires_reference
from deepseek_vl2.inputs.processor import DeepseekVL2Processor, ProcessedInputs
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


@pytest.mark.parametrize("bug", list(BF16_BUGS))
def test_an_injected_bf16_bug_fails(bug: str) -> None:
    """Each bug of tools/parity/bf16_bugs.py (rope angles in bf16; position ids cast through bf16,
    which moves the rotary angles and the causal mask past 256; the LM head 1.6 % off) breaks
    bound 1, the routing-held one, beyond its noise allowance."""
    model = _bf16_model()
    with BF16_BUGS[bug](model):
        problems = _problems(model)
    assert any("routing held" in p for p in problems), problems

"""The prefix cache in bfloat16: a second turn that reuses the first turn's KV is held to the bf16
check's bounds (tools/parity/bf16_bounds.py), against the float32-storage and float64 reference
runs of its whole sequence — exactly what an uncached bf16 run is held to — and a cache bug fails.

Turn 1 asks about the shared fixtures' ``small_200x150`` image (437 positions), turn 2 is text
after it and its answer; both go through the scheduler on the ``tiny`` checkpoint in bfloat16.
tools/parity/bf16_prefix_cache.py says which positions are compared and which bounds apply.
"""
from __future__ import annotations

import functools

import pytest
import torch

from deepseek_vl2.engine.generation import Generator
from deepseek_vl2.engine.sampling import SamplingParams
from deepseek_vl2.model.checkpoint import load_model
from tools.parity.bf16_bounds import bf16_figures, bf16_problems
from tools.parity.bf16_check import ReferenceRuns, perturb_by_float32_rounding, reference_runs
from tools.parity.bf16_prefix_cache import (CachedRun, Conversation, cached_bf16_runs, compared_rows, converse,
                                            run_cached)
from tools.parity.prefix_cache_bugs import embeds_shifted_by_one
from tools.parity.reference_data import case_names, checkpoint_dir, config_names, load_case_inputs, requires_reference

CONFIG, CASE = "tiny", "small_200x150"
FIRST, SECOND = "<image>\nWhat is in this picture?", "Which colour is the largest, and why?"
# 12 tokens: turn 2's compared positions are its 33 prompt positions after the reused KV and 11 generated ones
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=12, ignore_eos=True)
MIN_COMPARED = 30  # fewer positions: a wide noise allowance, and a check that says little
pytestmark = [
    requires_reference,
    pytest.mark.skipif(CONFIG not in config_names() or CASE not in case_names(),
                       reason=f"the fixtures have no {CONFIG}/{CASE}"),
]


@functools.lru_cache(maxsize=None)
def _generator() -> Generator:
    return Generator.load(checkpoint_dir(CONFIG), device="cpu", dtype=torch.bfloat16, max_batch=1)


@functools.lru_cache(maxsize=None)
def _conversation_and_reference() -> tuple[Conversation, ReferenceRuns]:
    _, images = load_case_inputs(CASE)
    conversation = converse(_generator(), FIRST, images, SECOND, GREEDY)
    exact = load_model(checkpoint_dir(CONFIG), device="cpu", dtype=torch.float64)
    perturbed = load_model(checkpoint_dir(CONFIG), device="cpu", dtype=torch.float64)
    perturb_by_float32_rounding(perturbed)
    return conversation, reference_runs(exact, perturbed, conversation.sequence)


def _held_and_free() -> tuple[CachedRun, CachedRun]:
    conversation, reference = _conversation_and_reference()
    generator = _generator()
    return run_cached(generator, conversation, GREEDY, reference.routing), run_cached(generator, conversation, GREEDY)


def test_the_cached_turn_is_within_the_bf16_bounds() -> None:
    conversation, reference = _conversation_and_reference()
    held, free = _held_and_free()
    first_prompt = conversation.first.input_ids.numel()
    assert held.cached_tokens == free.cached_tokens >= first_prompt  # turn 2 reuses at least turn 1's prompt
    rows = compared_rows(held, conversation)
    assert rows.stop - rows.start >= MIN_COMPARED and rows.stop > held.prompt_tokens, rows  # generated tokens too
    # the rows read at the final norm are the scheduler's own where it recorded logits
    by_position = held.routing.logits(conversation.sequence.input_ids.numel())
    for step, logits in enumerate(held.step_logits[: rows.stop - held.prompt_tokens + 1]):
        assert torch.equal(by_position[held.prompt_tokens - 1 + step], logits.to(torch.float64))
    figures = bf16_figures(cached_bf16_runs(held, free, conversation, reference))
    assert figures["positions"] == rows.stop - rows.start
    assert bf16_problems(figures) == [], figures


def test_a_cache_bug_fails_the_routing_held_bound() -> None:
    """Turn 2's prefill after the reused KV embeds each position with the previous token: the
    routing-held run's logit error is far beyond what bf16 rounding explains (about 60x the allowance)."""
    conversation, reference = _conversation_and_reference()
    with embeds_shifted_by_one(_generator()):
        held, free = _held_and_free()
    assert held.cached_tokens >= conversation.first.input_ids.numel()
    problems = bf16_problems(bf16_figures(cached_bf16_runs(held, free, conversation, reference)))
    assert any("routing held" in p for p in problems), problems

"""NaN or infinite scores never index out of range: the decode step's sampler keeps every id in
the vocabulary, the first-token sampler marks the row, and that request fails with a clear
message while the server serves the next one."""
from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from deepseek_vl2.engine.generation import Generator
from deepseek_vl2.engine.non_finite import NON_FINITE_TOKEN, NonFiniteLogitsError
from deepseek_vl2.engine.sampling import RowColumns, SamplingParams, choose_tokens, make_generator, sample_next, update_seen
from deepseek_vl2.engine.scheduler import BatchScheduler
from deepseek_vl2.engine.streaming import TextStreamer

VOCAB = 50
ROWS = {"nan": [math.nan], "+inf": [math.inf], "all -inf": [-math.inf] * VOCAB}


def _logits(bad: list[float]) -> torch.Tensor:
    """Row 0 finite (its maximum at id 7), row 1 with ``bad`` values in its first entries."""
    logits = torch.randn(2, VOCAB, generator=torch.Generator().manual_seed(0))
    logits[0, 7] = 10.0
    logits[1, : len(bad)] = torch.tensor(bad)
    return logits


@pytest.mark.parametrize("temperature", [0.0, 0.8])
@pytest.mark.parametrize("bad", list(ROWS))
def test_first_token_sampler_marks_the_row_and_leaves_the_others(bad: str, temperature: float) -> None:
    logits = _logits(ROWS[bad])
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=temperature, seed=1)]
    seen = torch.zeros(2, VOCAB, dtype=torch.bool)
    tokens = sample_next(logits, seen, params, [None, make_generator(1)[0]])
    assert tokens.tolist() == [7, NON_FINITE_TOKEN]


def test_some_minus_inf_scores_are_a_normal_row() -> None:
    logits = _logits([-math.inf] * 10)
    seen = torch.zeros(2, VOCAB, dtype=torch.bool)
    tokens = sample_next(logits, seen, [SamplingParams(temperature=0.0)] * 2, [None, None])
    assert tokens[1] == logits[1].argmax() and tokens[1] >= 10


@pytest.mark.parametrize("bad", list(ROWS))
def test_decode_step_sampler_keeps_every_id_in_the_vocabulary(bad: str) -> None:
    logits = _logits(ROWS[bad])
    seen = torch.zeros(2, VOCAB, dtype=torch.bool)
    params = [SamplingParams(temperature=0.7, top_p=0.9, seed=2), SamplingParams(temperature=0.7, top_p=0.9, seed=3)]
    uniforms = torch.tensor([[0.5], [0.999]], dtype=torch.float64)
    for columns in (None, RowColumns.of(params, logits.device)):
        tokens = choose_tokens(logits, seen, columns, uniforms)
        assert ((tokens >= 0) & (tokens < VOCAB)).all(), tokens


def test_update_seen_marks_nothing_for_the_mark() -> None:
    seen = torch.zeros(2, VOCAB, dtype=torch.bool)
    update_seen(seen, torch.tensor([4, NON_FINITE_TOKEN]))
    assert seen[0].nonzero().flatten().tolist() == [4] and not seen[1].any()


def test_streamer_turns_the_mark_into_the_error(generator: Generator) -> None:
    streamer = TextStreamer(generator.processor.tokenizer)
    with pytest.raises(NonFiniteLogitsError, match="NaN or infinite scores"):
        streamer.push(NON_FINITE_TOKEN)


@pytest.fixture
def poisonable(random_checkpoint: Callable[[str], Path]) -> Generator:
    """A tiny generator of its own: the test writes NaN into its weights."""
    return Generator.load(random_checkpoint("tiny"), device="cpu", dtype=torch.float32)


PARAMS = SamplingParams(temperature=0.7, seed=4, max_new_tokens=4, ignore_eos=True)


def _poison_one_prompt(scheduler: BatchScheduler):
    """(bad, good inputs, good's tokens before): NaN in the embedding of a token only ``bad`` has,
    which reaches its logits through attention."""
    generator = scheduler.generator
    good, bad = generator.prepare("Hi", []), generator.prepare("zebra crossing at night", [])
    expected = scheduler.run(good, PARAMS).tokens
    only_bad = sorted(set(bad.input_ids.flatten().tolist()) - set(good.input_ids.flatten().tolist()))
    with torch.no_grad():
        generator.model.language.model.embed_tokens.weight[only_bad[0]] = math.nan
    return bad, good, expected


def test_a_request_with_nan_scores_fails_clearly_and_the_next_is_served(poisonable: Generator) -> None:
    scheduler = BatchScheduler(poisonable, max_batch=2, max_len=1024)
    try:
        bad, good, _ = _poison_one_prompt(scheduler)
        with pytest.raises(NonFiniteLogitsError, match="NaN or infinite scores for this request"):
            scheduler.run(bad, PARAMS)
        assert len(scheduler.run(good, PARAMS).tokens) == PARAMS.max_new_tokens  # raises if it failed
    finally:
        scheduler.close()


def test_the_next_request_in_the_failed_slot_gets_its_own_tokens(poisonable: Generator) -> None:
    scheduler = BatchScheduler(poisonable, max_batch=2, max_len=1024)
    try:
        bad, good, expected = _poison_one_prompt(scheduler)
        with pytest.raises(NonFiniteLogitsError):
            scheduler.run(bad, PARAMS)
        assert scheduler.run(good, PARAMS).tokens == expected
    finally:
        scheduler.close()

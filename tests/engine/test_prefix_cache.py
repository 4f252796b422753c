"""The prefix cache (engine/prefix_cache.py): a finished request's slot stays parked with its
tokens, and a request beginning with them prefills only the rest — with the same answer.

Two float32 generators over one tiny random checkpoint, one with the cache and one without; a
conversation runs on both and every turn's tokens (and the logits they were chosen from) are
compared. Hit, partial hit, a changed image, a third image re-tiling the first two, two requests
matching one parked slot, a cancel mid-prompt, eviction and the off switch.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from PIL import Image

from deepseek_vl2.engine.config import ConfigError, EngineConfig
from deepseek_vl2.engine.generation import Generator
from deepseek_vl2.engine.prefix_cache import common_prefix, sequence_keys
from deepseek_vl2.engine.request import Request
from deepseek_vl2.engine.sampling import SamplingParams
from deepseek_vl2.engine.scheduler import BatchScheduler
from deepseek_vl2.inputs.processor import ProcessedInputs

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=6)
# float32 logits of one prompt prefilled whole or after reused KV differ only in summation order
# (other chunk shapes): measured at most 3.8e-6 over these tests; the bound leaves ~10x
LOGITS_TOLERANCE = 5e-5


def _image(width: int, height: int, seed: int) -> Image.Image:
    pixels = torch.randint(0, 256, (height, width, 3), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


@pytest.fixture(scope="module")
def checkpoint(random_checkpoint) -> Path:
    return random_checkpoint("tiny")


@pytest.fixture(scope="module")
def cached(checkpoint: Path) -> Generator:
    return Generator.load(checkpoint, device="cpu", dtype=torch.float32, max_batch=2)


@pytest.fixture(scope="module")
def uncached(checkpoint: Path) -> Generator:
    return Generator.load(checkpoint, device="cpu", dtype=torch.float32, max_batch=2, prefix_cache=False)


@pytest.fixture
def fresh(cached: Generator) -> Generator:
    """The cached generator with nothing parked."""
    cached.prefix_cache.clear()
    return cached


def _answer_text(generator: Generator, request: Request) -> str:
    return generator.processor.tokenizer.decode([t for t in request.tokens if t != generator.eos_id],
                                                skip_special_tokens=True)


def converse(generator: Generator, turns: Sequence[tuple[str, Sequence[Image.Image]]]) -> list[Request]:
    """Run the turns (prompt with its ``<image>`` tags, the images it adds) one after the other, each
    after the earlier turns and their answers; the finished request of every turn."""
    history: list[dict[str, str]] = []
    images: list[Image.Image] = []
    done = []
    with BatchScheduler(generator) as scheduler:
        for prompt, added in turns:
            images += added
            request = scheduler.run(generator.prepare(prompt, images, history=history), GREEDY, record_logits=True)
            history += [{"role": "user", "content": prompt}, {"role": "assistant", "content": _answer_text(generator, request)}]
            done.append(request)
    return done


def assert_same_answers(ours: Sequence[Request], reference: Sequence[Request]) -> None:
    for turn, (a, b) in enumerate(zip(ours, reference)):
        assert a.tokens == b.tokens, f"turn {turn + 1}"
        error = max(float((x - y).abs().max()) for x, y in zip(a.step_logits, b.step_logits))
        assert error < LOGITS_TOLERANCE, f"turn {turn + 1}: logits differ by {error}"


def first_image_position(inputs: ProcessedInputs) -> int:
    return int(torch.nonzero(inputs.images_seq_mask)[0, 0])


def _run_one(generator: Generator, inputs: ProcessedInputs) -> Request:
    with BatchScheduler(generator) as scheduler:
        return scheduler.run(inputs, GREEDY, record_logits=True)


@pytest.mark.parametrize("with_image", [False, True], ids=["text", "image"])
def test_multi_turn_reuses_the_earlier_turns_and_answers_the_same(fresh: Generator, uncached: Generator,
                                                                 with_image: bool) -> None:
    turns = [("<image>\nWhat is in this picture?" if with_image else "Name three rivers.",
              [_image(640, 480, 1)] if with_image else []),
             ("Which one is the longest, and why?", []), ("Say it again in five words.", [])]
    ours, reference = converse(fresh, turns), converse(uncached, turns)
    assert_same_answers(ours, reference)
    assert [r.stats.prompt_tokens for r in ours] == [r.stats.prompt_tokens for r in reference]
    assert ours[0].stats.cached_tokens == 0
    for earlier, later in zip(ours, ours[1:]):  # at least the earlier prompt is reused, never the whole prompt
        assert earlier.stats.prompt_tokens <= later.stats.cached_tokens < later.stats.prompt_tokens
    assert all(r.stats.cached_tokens == 0 for r in reference)


def test_partial_hit_reuses_the_common_prefix_only(fresh: Generator, uncached: Generator) -> None:
    image = _image(640, 480, 2)
    first = fresh.prepare("<image>\nDescribe the colours.", [image])
    second = fresh.prepare("<image>\nCount the objects.", [image])
    _run_one(fresh, first)
    ours = _run_one(fresh, second)
    shared = common_prefix(sequence_keys(first), sequence_keys(second))
    assert first_image_position(second) < shared < second.input_ids.numel()  # the image is reused, the question not
    assert ours.stats.cached_tokens == shared
    assert_same_answers([ours], [_run_one(uncached, second)])


def test_a_changed_image_is_a_miss_from_its_first_position(fresh: Generator, uncached: Generator) -> None:
    image = _image(640, 480, 3)
    changed = image.copy()
    changed.putpixel((320, 240), (0, 0, 0))  # one pixel: same size, same tiling, same placeholder ids
    prompt = "<image>\nWhat is this?"
    _run_one(fresh, fresh.prepare(prompt, [image]))
    original, inputs = fresh.prepare(prompt, [image]), fresh.prepare(prompt, [changed])
    assert torch.equal(original.input_ids, inputs.input_ids)
    assert common_prefix(sequence_keys(original), sequence_keys(inputs)) == first_image_position(inputs)
    ours = _run_one(fresh, inputs)
    assert ours.stats.cached_tokens <= first_image_position(inputs)  # nothing of the image is reused
    assert_same_answers([ours], [_run_one(uncached, inputs)])


def test_a_third_image_retiling_the_first_two_is_a_miss(fresh: Generator, uncached: Generator) -> None:
    turns = [("<image>\n<image>\nCompare these.", [_image(640, 480, 4), _image(300, 200, 5)]),
             ("<image>\nAnd this one?", [_image(500, 500, 6)])]
    ours, reference = converse(fresh, turns), converse(uncached, turns)
    two, three = ours[0].inputs, ours[1].inputs
    assert two.images_spatial_crop[0].tolist() != three.images_spatial_crop[0].tolist()  # the first image re-tiled
    assert common_prefix(sequence_keys(two), sequence_keys(three)) == first_image_position(three)
    assert ours[1].stats.cached_tokens <= first_image_position(three)
    assert_same_answers(ours, reference)


def test_two_requests_matching_one_parked_slot(fresh: Generator, uncached: Generator) -> None:
    """Both wait when the slot is chosen: the first takes the parked slot, the other prefills in full."""
    image = _image(640, 480, 7)
    first = fresh.prepare("<image>\nWhat is this?", [image])
    with BatchScheduler(fresh) as scheduler:
        turn1 = scheduler.run(first, GREEDY)
        history = [{"role": "user", "content": "<image>\nWhat is this?"},
                   {"role": "assistant", "content": _answer_text(fresh, turn1)}]
        follow = fresh.prepare("Tell me more.", [image], history=history)
        with scheduler._wake:  # neither is admitted before both are queued
            handles = [scheduler.submit(follow, GREEDY, record_logits=True) for _ in range(2)]
        for handle in handles:
            list(handle)
    requests = [h.request for h in handles]
    assert sorted(r.stats.cached_tokens for r in requests)[0] == 0
    assert sorted(r.stats.cached_tokens for r in requests)[1] >= first.input_ids.numel()
    reference = _run_one(uncached, follow)
    assert_same_answers(requests, [reference, reference])


def test_a_cancelled_prompt_parks_only_the_kv_written(fresh: Generator, uncached: Generator) -> None:
    inputs = fresh.prepare("<image>\nWhat is this?", [_image(640, 480, 8)])
    chunk, fresh.prefill_chunk = fresh.prefill_chunk, 256
    try:
        request = fresh.new_request(inputs, GREEDY)
        fresh.admit(request)
        slot = request.slot
        assert not fresh.prefill_step(request)  # one chunk in, the prompt not
        request.finish("cancelled")
        fresh.release(request)
    finally:
        fresh.prefill_chunk = chunk
    assert fresh.prefix_cache.parked == {slot: 256}
    ours = _run_one(fresh, inputs)
    assert ours.stats.cached_tokens == 256
    assert_same_answers([ours], [_run_one(uncached, inputs)])


def test_a_cancelled_answer_parks_the_prompt_and_the_tokens_with_kv(fresh: Generator) -> None:
    """The last sampled token has no KV yet: it is not parked."""
    inputs = fresh.prepare("Count to twenty.", [])
    with BatchScheduler(fresh) as scheduler:
        handle = scheduler.submit(inputs, SamplingParams(temperature=0.0, max_new_tokens=50, ignore_eos=True))
        next(iter(handle))
        handle.cancel()
        list(handle)
    request = handle.request
    assert request.stats.finish_reason == "cancelled" and 1 <= len(request.tokens) < 50
    assert list(fresh.prefix_cache.parked.values()) == [inputs.input_ids.numel() + len(request.tokens) - 1]


def test_eviction_forgets_the_least_recently_parked(fresh: Generator, uncached: Generator) -> None:
    """Unrelated prompts (sharing only the template's first tokens) fill the unparked slot first,
    then evict the least recently parked one, reusing only what it shares."""
    prompts = [fresh.prepare(text, []) for text in ("Alpha beta gamma.", "Delta epsilon.", "Zeta eta theta.")]
    ran = [_run_one(fresh, inputs) for inputs in prompts]  # two slots: the third takes the first one's
    assert ran[1].stats.cached_tokens == 0 and ran[2].stats.cached_tokens > 0
    assert sorted(fresh.prefix_cache.parked.values()) == sorted(
        r.stats.prompt_tokens + len(r.tokens) - 1 for r in ran[1:])
    again = _run_one(fresh, prompts[0])  # its own tokens were forgotten; the second prompt's slot is evicted
    assert again.stats.cached_tokens == common_prefix(sequence_keys(prompts[0]), sequence_keys(prompts[1])) > 0
    assert again.stats.cached_tokens < prompts[0].input_ids.numel() // 2
    assert_same_answers([again], [_run_one(uncached, prompts[0])])


def test_a_failed_request_parks_nothing(fresh: Generator) -> None:
    request = fresh.new_request(fresh.prepare("Hello.", []), GREEDY)
    fresh.admit(request)
    fresh.prefill_step(request)
    request.finish("error", RuntimeError("boom"))
    fresh.release(request)
    assert fresh.prefix_cache.parked == {}


def test_the_off_switch(uncached: Generator) -> None:
    assert EngineConfig.from_environment({"DSVL2_PREFIX_CACHE": "0"}).prefix_cache is False
    assert EngineConfig.from_environment({}).prefix_cache is True
    with pytest.raises(ConfigError, match="DSVL2_PREFIX_CACHE must be 0"):
        EngineConfig.from_environment({"DSVL2_PREFIX_CACHE": "yes"})
    inputs = uncached.prepare("Hello there.", [])
    runs = [_run_one(uncached, inputs) for _ in range(2)]
    assert [r.stats.cached_tokens for r in runs] == [0, 0] and uncached.prefix_cache.parked == {}

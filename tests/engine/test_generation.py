"""Generation engine: chunked prefill, seeds, budgets, streaming stats and the batching scheduler.

Runs on small random checkpoints written by tools/checkpoints.py (no fixtures needed).
"""
from __future__ import annotations

import threading

import pytest
import torch
from PIL import Image

from deepseek_vl2.engine.generation import ContextLengthError, Generator
from deepseek_vl2.engine.sampling import SamplingParams
from deepseek_vl2.engine.scheduler import BatchScheduler
from tools.checkpoints import make_checkpoint


def _image(width: int = 500, height: int = 300) -> Image.Image:
    gradient = torch.linspace(0, 255, width).to(torch.uint8).repeat(height, 1)
    rgb = torch.stack([gradient, gradient.flip(1), torch.full_like(gradient, 90)], dim=-1)
    return Image.fromarray(rgb.numpy(), "RGB")


def _greedy(max_new: int = 8) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_new_tokens=max_new)


def _prefill_logits(scheduler: BatchScheduler, inputs, chunk: int) -> tuple[torch.Tensor, list[int]]:
    """The first token's logits (from the prefill) and the greedy tokens, prefilling ``chunk`` tokens at a time."""
    generator, default = scheduler.generator, scheduler.generator.prefill_chunk
    generator.prefill_chunk = chunk
    try:
        request = scheduler.run(inputs, _greedy(6), record_logits=True)
    finally:
        generator.prefill_chunk = default
    return request.step_logits[0], request.tokens


def test_chunked_prefill_equals_whole_prompt(generator: Generator, scheduler: BatchScheduler) -> None:
    inputs = generator.prepare("Describe <image> briefly.", [_image()])
    total = inputs.input_ids.numel()
    whole_logits, whole_tokens = _prefill_logits(scheduler, inputs, chunk=total)
    for chunk in (1, 7, 64):
        logits, tokens = _prefill_logits(scheduler, inputs, chunk)
        diff = (logits - whole_logits).abs().max().item()
        assert diff < 1e-4, f"chunk {chunk}: max logit diff {diff}"
        assert tokens == whole_tokens, f"chunk {chunk}"


def test_cached_decode_equals_full_forward(generator: Generator, scheduler: BatchScheduler) -> None:
    inputs = generator.prepare("Hello there, what is this?", [])
    tokens = scheduler.run(inputs, _greedy(6)).tokens
    ids = torch.cat([inputs.input_ids, torch.tensor(tokens[:-1])]).unsqueeze(0)
    with torch.inference_mode():
        logits = generator.model.forward_tokens(ids, torch.arange(ids.shape[1]).unsqueeze(0))[0]
    recomputed = logits[inputs.input_ids.numel() - 1 :].argmax(-1).tolist()
    assert recomputed == tokens


def test_seed_reproducible_and_distinct(generator: Generator, scheduler: BatchScheduler) -> None:
    inputs = generator.prepare("Tell me a story about <image>", [_image(300, 300)])
    params = lambda seed: SamplingParams(temperature=1.0, top_p=1.0, repetition_penalty=1.0, max_new_tokens=12, seed=seed)  # noqa: E731
    first = scheduler.run(inputs, params(1)).tokens
    again = scheduler.run(inputs, params(1)).tokens
    other = scheduler.run(inputs, params(2)).tokens
    assert first == again
    assert first != other
    assert scheduler.run(inputs, _greedy(5)).tokens == scheduler.run(inputs, _greedy(5)).tokens


def test_stream_pieces_join_to_decode_and_stats(generator: Generator, scheduler: BatchScheduler) -> None:
    inputs = generator.prepare("Say something.", [])
    params = SamplingParams(temperature=0.7, max_new_tokens=10, seed=3)
    handle = scheduler.submit(inputs, params)
    pieces = list(handle)
    tokens, stats = handle.request.tokens, handle.stats
    expected = generator.processor.tokenizer.decode(
        [t for t in tokens if t not in generator.hidden_token_ids and t < len(generator.processor.tokenizer)]
    )
    assert "".join(pieces) == expected
    assert stats.new_tokens == len(tokens) and stats.prompt_tokens == inputs.input_ids.numel()
    assert stats.seed == 3 and stats.finish_reason in ("stop", "length")
    assert stats.time_to_first_token > 0


def test_budget_shrinks_max_new_tokens_and_rejects_overflow(generator: Generator) -> None:
    context = generator.context_length
    assert generator.budget(context - 10, 2048) == 10
    with pytest.raises(ContextLengthError, match=f"holds {context}"):
        generator.budget(context + 5, 10)


def test_batched_requests_equal_sequential(generator: Generator) -> None:
    prompts = [("Describe <image>.", [_image(400, 300)]), ("What is two plus two?", []),
               ("Compare <image> and <image>.", [_image(200, 200), _image(640, 200)]), ("Hi", [])]
    inputs = [generator.prepare(p, imgs) for p, imgs in prompts]
    params = [_greedy(7), SamplingParams(temperature=0.8, max_new_tokens=9, seed=11),
              _greedy(5), SamplingParams(temperature=0.5, top_k=5, max_new_tokens=6, seed=5)]
    scheduler = BatchScheduler(generator, max_batch=3, max_len=2048)
    try:
        sequential = [scheduler.run(i, p).tokens for i, p in zip(inputs, params)]
        handles = [scheduler.submit(i, p) for i, p in zip(inputs, params)]
        texts = [None] * len(handles)

        def consume(k: int) -> None:
            texts[k] = "".join(handles[k])

        threads = [threading.Thread(target=consume, args=(k,)) for k in range(len(handles))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert [h.request.tokens for h in handles] == sequential
        assert all(isinstance(t, str) for t in texts)
    finally:
        scheduler.close()


def test_scheduler_cancel_frees_slot_and_failure_is_isolated(generator: Generator) -> None:
    scheduler = BatchScheduler(generator, max_batch=2, max_len=1024)
    try:
        long = scheduler.submit(generator.prepare("Go on forever", []), SamplingParams(temperature=1.0, max_new_tokens=400, seed=1))
        first = next(iter(long))
        assert isinstance(first, str)
        long.cancel()
        list(long)  # ends promptly after cancel
        assert long.stats.finish_reason == "cancelled"
        broken_inputs = generator.prepare("Describe <image>", [_image()])
        broken_inputs.images_seq_mask = broken_inputs.images_seq_mask.clone()
        broken_inputs.images_seq_mask[1] = True  # one image position too many: embedding fails
        with pytest.raises(ValueError, match="image positions"):  # refused at submit or while it runs
            list(scheduler.submit(broken_inputs, _greedy(4)))
        fine = scheduler.submit(generator.prepare("Hello", []), _greedy(4))
        assert "".join(fine) is not None and len(fine.request.tokens) >= 1
        assert scheduler.active == 0 and sorted(generator.engine.free_slots) == list(range(generator.engine.slots))
    finally:
        scheduler.close()


def test_kv_length_bucketing_does_not_change_results(generator: Generator, scheduler: BatchScheduler) -> None:
    inputs = generator.prepare("Bucket test <image>", [_image(300, 200)])
    params = SamplingParams(temperature=0.9, max_new_tokens=10, seed=4)
    bucketed = scheduler.run(inputs, params).tokens
    generator.kv_bucket = 1
    try:
        exact = scheduler.run(inputs, params).tokens
    finally:
        generator.kv_bucket = 256
    assert bucketed == exact


def test_cache_read_by_slice_is_a_view_equal_to_the_gather(generator: Generator) -> None:
    cache = generator.model.new_cache(3, 16)
    layer = cache.layers[0]
    layer.first.normal_()
    layer.second.normal_()
    by_slice = layer.read(slice(1, 3), 9)
    by_index = layer.read(torch.tensor([1, 2]), 9)
    assert all(torch.equal(a, b) for a, b in zip(by_slice, by_index))
    assert by_slice[0].data_ptr() == layer.first[1].data_ptr(), "a slice read must not copy"
    positions = torch.tensor([[4, 5]])
    new_first = torch.randn(1, 2, *layer.first.shape[2:])
    layer.write(slice(2, 3), positions, new_first, torch.randn(1, 2, *layer.second.shape[2:]))
    assert torch.equal(layer.first[2, 4:6], new_first[0])


def test_ignore_eos_runs_to_max_new_tokens(tmp_path) -> None:
    path = make_checkpoint(tmp_path / "eos", variant="tiny", seed=3, eos_boost=40.0)  # eos comes early
    gen = Generator.load(path, device="cpu", dtype=torch.float32)
    inputs = gen.prepare("Hello", [])
    with BatchScheduler(gen) as scheduler:
        stopped = scheduler.run(inputs, _greedy(8))
        ignored = scheduler.run(inputs, SamplingParams(temperature=0.0, max_new_tokens=8, ignore_eos=True))
    assert stopped.tokens[-1] == gen.eos_id and len(stopped.tokens) < 8 and stopped.stats.finish_reason == "stop"
    assert len(ignored.tokens) == 8 and ignored.tokens[: len(stopped.tokens)] == stopped.tokens
    assert ignored.stats.finish_reason == "length"

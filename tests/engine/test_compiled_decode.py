"""The compiled decode step (engine/decode.py) against the eager one and the reference fixtures.

Compiling costs tens of seconds per (checkpoint, mode) on a small CPU, so these tests share
one compiled generator per reference checkpoint; every case of the tiny checkpoint runs (greedy,
with and without repetition penalty), and one greedy case each of small and base (MLA
attention, q-LoRA, group-limited routing).
"""
from __future__ import annotations

import functools
import re
import threading
import types

import pytest
import torch
from torch._dynamo.utils import counters

from deepseek_vl2.engine.decode import batch_buckets
from deepseek_vl2.engine.generation import Generator
from deepseek_vl2.engine.request import Phase
from deepseek_vl2.engine.sampling import SamplingParams
from deepseek_vl2.engine.scheduler import BatchScheduler
from deepseek_vl2.model.checkpoint import load_model
from deepseek_vl2.model.config import LanguageConfig
from deepseek_vl2.model.moe import StackedExperts
from tools.parity import moe_reference
from tools.parity.reference_data import case_names, checkpoint_dir, expected_outputs, reference_available, requires_reference
from tools.testing.inductor_code import buffer_numels
from tools.parity.reference_cases import processed_case, processor_for

LOGIT_TOL = dict(atol=1e-4, rtol=1e-4)  # the fixture README's tolerance for greedy_step_logits


@functools.lru_cache(maxsize=None)
def schedulers(config: str) -> tuple[BatchScheduler, BatchScheduler]:
    """(eager, compiled) schedulers of 3 slots, their generators sharing one float32 model of a
    reference checkpoint (their threads wait, idle, between tests)."""
    model = load_model(checkpoint_dir(config), device="cpu", dtype=torch.float32)
    processor = processor_for(config)
    return tuple(BatchScheduler(Generator(model, processor, compile=mode), max_batch=3, max_len=4096)
                 for mode in (False, True))


def _ids(scheduler: BatchScheduler, inputs, params: SamplingParams) -> list[int]:
    return scheduler.run(inputs, params).tokens


def _ids_and_logits(scheduler: BatchScheduler, inputs, params: SamplingParams) -> tuple[list[int], torch.Tensor]:
    request = scheduler.run(inputs, params, record_logits=True)
    return request.tokens, torch.stack(request.step_logits)


def _cases() -> list:
    if not reference_available():
        return [pytest.param("tiny", "none", marks=requires_reference)]
    cases = [pytest.param("tiny", case, id=f"tiny-{case}") for case in case_names()]
    return cases + [pytest.param(config, "small_200x150", id=f"{config}-small_200x150") for config in ("small", "base")]


def _greedy(n_new: int, penalty: float = 1.0) -> SamplingParams:
    return SamplingParams(temperature=0.0, repetition_penalty=penalty, penalize_greedy=penalty != 1.0,
                          max_new_tokens=n_new)


@pytest.mark.slow  # torch.compile on the CPU
@requires_reference
@pytest.mark.parametrize(("config", "case"), _cases())
def test_compiled_decode_matches_eager_and_reference(config: str, case: str) -> None:
    expected, meta = expected_outputs(config, case)
    eager, compiled = schedulers(config)
    inputs = processed_case(config, case)
    n_new = meta["greedy"]["n_new"]
    tokens, logits = _ids_and_logits(compiled, inputs, _greedy(n_new))
    eager_tokens, eager_logits = _ids_and_logits(eager, inputs, _greedy(n_new))
    assert tokens == eager_tokens == meta["greedy"]["new_tokens"]
    reference = expected["greedy_step_logits"]
    diff = (logits[: len(reference)] - reference).abs().max().item()
    assert torch.allclose(logits[: len(reference)], reference, **LOGIT_TOL), f"max diff to the reference {diff:.3g}"
    assert (logits - eager_logits).abs().max().item() <= 1e-4
    key = "greedy_repetition_penalty_1.1"
    if key in meta and config == "tiny":  # the sampler's graph is the same for every model: compile it once
        penalised = _ids(compiled, inputs, _greedy(meta[key]["n_new"], 1.1))
        assert penalised == meta[key]["new_tokens"] == _ids(eager, inputs, _greedy(meta[key]["n_new"], 1.1))


@pytest.mark.slow  # torch.compile on the CPU
@requires_reference
def test_no_recompilation_over_64_steps_and_across_kv_buckets() -> None:
    _, compiled = schedulers("tiny")
    inputs = processed_case("tiny", "text_only")  # 17 prompt tokens: 64 steps stay in the first KV bucket
    params = SamplingParams(temperature=0.0, max_new_tokens=65, ignore_eos=True)
    _ids(compiled, inputs, params)  # compiles (or reuses) the greedy step
    before = dict(counters["stats"]), dict(counters["frames"])
    assert len(_ids(compiled, inputs, params)) == 65
    assert (dict(counters["stats"]), dict(counters["frames"])) == before, "the step recompiled inside one bucket"
    long_prompt = processed_case("tiny", "small_200x150")  # 433 tokens: KV bucket 512, another kv_len
    _ids(compiled, long_prompt, SamplingParams(temperature=0.0, max_new_tokens=3))
    assert dict(counters["stats"]).get("unique_graphs") == before[0].get("unique_graphs"), \
        "a new KV bucket must reuse the compiled step (kv_len is dynamic)"


@pytest.mark.slow  # torch.compile on the CPU
@requires_reference
def test_compiled_batched_decode_equals_single_and_eager() -> None:
    eager, compiled = schedulers("tiny")
    cases = ["text_only", "small_200x150", "two_turn"]
    inputs = [processed_case("tiny", c) for c in cases]
    params = [_greedy(9), SamplingParams(temperature=0.8, top_p=0.9, top_k=40, max_new_tokens=7, seed=5),
              SamplingParams(temperature=0.6, repetition_penalty=1.3, max_new_tokens=8, seed=9, ignore_eos=True)]
    single = [_ids(compiled, i, p) for i, p in zip(inputs, params)]
    assert single == [_ids(eager, i, p) for i, p in zip(inputs, params)]
    handles = [compiled.submit(i, p) for i, p in zip(inputs, params)]
    for handle in handles:
        "".join(handle)
    assert [h.request.tokens for h in handles] == single


@pytest.mark.slow  # torch.compile on the CPU
@requires_reference
def test_warmup_reports_buckets_and_leaves_a_running_request_alone(monkeypatch) -> None:
    """A warm-up while a request is decoding (its scheduler held after its fourth token) leaves that
    request's tokens exactly as they are without one."""
    _, compiled = schedulers("tiny")
    generator = compiled.generator
    inputs = processed_case("tiny", "text_only")
    params = SamplingParams(temperature=0.7, max_new_tokens=12, seed=2, ignore_eos=True)
    expected = _ids(compiled, inputs, params)
    paused, resume = threading.Event(), threading.Event()
    real_accept = generator.accept

    def accept_pausing_after_four(request, token):
        piece = real_accept(request, token)
        if len(request.tokens) == 4:
            paused.set()
            resume.wait(timeout=300)
        return piece

    monkeypatch.setattr(generator, "accept", accept_pausing_after_four)
    handle = compiled.submit(inputs, params)
    assert paused.wait(timeout=120), "the request never reached its fourth token"
    try:
        assert handle.request.phase is Phase.DECODING
        timings = generator.warmup()  # every rows bucket, both modes; no CUDA graphs on the CPU
    finally:
        resume.set()
    rows = batch_buckets(generator.engine.slots)
    assert sorted(timings) == sorted(f"rows={r} mode={m}" for r in rows for m in ("full", "greedy"))
    assert generator.engine.path == "compiled" and generator.engine.sealed
    assert all(seconds >= 0 for seconds in timings.values())
    "".join(handle)
    assert handle.request.tokens == expected


def test_batch_buckets() -> None:
    assert batch_buckets(1) == [1]
    assert batch_buckets(8) == [1, 2, 4, 8]
    assert batch_buckets(6) == [1, 2, 4, 6]


@pytest.mark.slow  # torch.compile on the CPU
@pytest.mark.parametrize("tokens", [1, 3])
def test_copy_free_moe_equals_the_reference_moe_and_copies_no_weights(tokens: int) -> None:
    from torch._inductor.utils import run_and_get_code

    torch.manual_seed(0)
    experts, hidden, inter, k = 16, 64, 48, 3
    stack = StackedExperts(experts, hidden, inter)
    with torch.no_grad():
        stack.gate_up.normal_(0, 0.1)
        stack.down.normal_(0, 0.1)
    x = torch.randn(tokens, hidden)
    ids = torch.stack([torch.randperm(experts)[:k] for _ in range(tokens)])
    with torch.inference_mode():
        reference = stack.grouped(x, ids)
        torch.testing.assert_close(moe_reference.gathered(stack, x, ids), reference, atol=1e-5, rtol=1e-5)
        compiled = torch.compile(stack.fused, fullgraph=True, dynamic=False)
        out, code = run_and_get_code(compiled, x, ids)
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)
    gathered = tokens * k * 2 * inter * hidden  # what gate_up[ids] would copy
    largest = max(buffer_numels("\n".join(code)), default=0)
    assert largest < gathered // 4, f"a buffer of {largest} elements: the chosen weights were copied"


def test_looped_moe_equals_the_reference_and_each_token_is_independent_of_the_batch() -> None:
    """The CPU eager decode path: same as grouping by expert, and a token's output is bitwise the
    same alone as in a batch (so batched decode equals single decode exactly in float32)."""
    torch.manual_seed(1)
    stack = StackedExperts(16, 64, 48)
    with torch.no_grad():
        stack.gate_up.normal_(0, 0.1)
        stack.down.normal_(0, 0.1)
    x = torch.randn(3, 64)
    ids = torch.stack([torch.randperm(16)[:4] for _ in range(3)])
    ids[1, 0] = ids[0, 0]  # one expert chosen by two tokens
    with torch.inference_mode():
        looped = stack.looped(x, ids)
        torch.testing.assert_close(looped, stack.grouped(x, ids), atol=1e-5, rtol=1e-5)
        for row in range(3):
            assert torch.equal(stack.looped(x[row : row + 1], ids[row : row + 1])[0], looped[row])


def test_eager_cpu_decode_loops_over_the_chosen_experts(monkeypatch) -> None:
    from deepseek_vl2.model.moe import MoE

    config = LanguageConfig(hidden_size=32, moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=2,
                            n_shared_experts=1, topk_method="greedy")
    moe = MoE(config)
    called = []
    original = StackedExperts.looped
    monkeypatch.setattr(StackedExperts, "looped", lambda self, x, ids: called.append(1) or original(self, x, ids))
    monkeypatch.setattr(StackedExperts, "fused", lambda self, x, ids: pytest.fail("gathered on the CPU"))
    with torch.inference_mode():
        moe(torch.randn(2, 1, 32))
    assert called == [1]


@pytest.mark.slow  # torch.compile on the CPU
def test_the_buffer_check_sees_a_copy() -> None:
    from torch._inductor.utils import run_and_get_code

    weights = torch.randn(16, 96, 64)
    ids = torch.tensor([1, 5, 7])
    _, code = run_and_get_code(torch.compile(lambda w, i: w[i] + 1, fullgraph=True), weights, ids)
    assert max(buffer_numels("\n".join(code))) >= 3 * 96 * 64


@pytest.mark.slow  # torch.compile on the CPU
def test_moe_decode_uses_the_indexed_path_only_when_compiling() -> None:
    config = LanguageConfig(hidden_size=32, moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=2,
                            n_shared_experts=1, topk_method="greedy")
    from deepseek_vl2.model.moe import MoE

    moe = MoE(config)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.2)
    x = torch.randn(2, 1, 32)
    with torch.inference_mode():
        eager = moe(x)
        compiled = torch.compile(moe, fullgraph=True, dynamic=False)(x)
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)


@requires_reference
def test_vision_tower_uses_fused_attention_on_all_tiles_in_one_batch() -> None:
    eager = schedulers("tiny")[0].generator
    vision = eager.model.vision
    assert all(block.attn.fused_attn for block in vision.blocks), "timm must use F.scaled_dot_product_attention"
    inputs = processed_case("tiny", "two_images")  # 7 tiles of two images
    batches = []
    hook = vision.patch_embed.register_forward_pre_hook(lambda _module, args: batches.append(args[0].shape[0]))
    try:
        with torch.inference_mode():
            eager.model.embed_inputs(inputs.input_ids, inputs.images, inputs.images_seq_mask,
                                     inputs.images_spatial_crop)
    finally:
        hook.remove()
    assert batches == [inputs.images.shape[0]] == [7]


@pytest.mark.slow  # torch.compile on the CPU
def test_a_bounded_dynamic_dimension_fails_on_a_shape_guard_and_the_engine_sets_no_bounds() -> None:
    """``mark_dynamic(min=, max=)`` turns any guard on the dimension (an attention backend's
    ``% 8`` choice, say) into ConstraintViolationError; without bounds the same guard compiles.
    So the decode engine marks kv_len dynamic without bounds."""
    from torch._dynamo.exc import UserError
    from torch.fx.experimental.symbolic_shapes import ConstraintViolationError

    def step(x: torch.Tensor) -> torch.Tensor:
        return x * 2 if x.shape[0] % 8 == 0 else x + 1

    torch._dynamo.reset()
    bounded = torch.arange(256.0)
    torch._dynamo.mark_dynamic(bounded, 0, min=2, max=4096)
    with pytest.raises((ConstraintViolationError, UserError)):
        torch.compile(step, fullgraph=True)(bounded)
    torch._dynamo.reset()
    plain = torch.arange(256.0)
    torch._dynamo.mark_dynamic(plain, 0)
    assert torch.equal(torch.compile(step, fullgraph=True)(plain), plain * 2)
    from deepseek_vl2.engine.decode import DecodeEngine

    engine = DecodeEngine.__new__(DecodeEngine)
    engine.compiled, engine.state = True, types.SimpleNamespace(key_positions=torch.arange(512))
    view = engine._key_positions(256)
    assert 0 in view._dynamo_dynamic_indices
    assert all(r.min is None and r.max is None for r in getattr(view, "_dynamo_dynamic_range", set()))

"""8-bit expert weights: the quantizer's error, the three MoE paths, compiled code, loading, sizing."""
from __future__ import annotations

import functools

import pytest
import torch

from deepseek_vl2.model.checkpoint import build_on_meta, load_model
from deepseek_vl2.model.config import LanguageConfig, config_from_dict
from deepseek_vl2.model.moe import MoE, StackedExperts, quantize_experts
from deepseek_vl2.model.quantization import QuantizedLinear, quantize_rows
from deepseek_vl2.weights.memory_plan import weight_bytes
from deepseek_vl2.weights.sizing import VARIANT_EXPERTS
from deepseek_vl2.weights.variants import VARIANTS
from tools.checkpoints import make_checkpoint
from tools.random_model import random_config_json
from tools.testing.inductor_code import buffer_numels

FORMATS = ("int8", "fp8")


@pytest.mark.parametrize("fmt", FORMATS)
def test_quantize_rows_error_is_half_a_step_of_each_row(fmt: str) -> None:
    """int8: a uniform grid of row max / 127, so every error is at most half a step. fp8 e4m3 keeps
    3 mantissa bits: a relative error of at most 2⁻⁴ for normal values (|w / scale| ≥ 2⁻⁶) and half
    the subnormal spacing (2⁻¹⁰ · scale) below that."""
    torch.manual_seed(0)
    w = torch.randn(5, 40, 64) * torch.rand(5, 40, 1) * 3  # rows of very different magnitudes
    w[0, 0] = 0.0  # an all-zero row stays zero
    q, scale = quantize_rows(w, fmt)
    assert q.shape == w.shape and scale.shape == w.shape[:2] and q.element_size() == 1
    restored = q.float() * scale.unsqueeze(-1)
    error = (restored - w).abs()
    assert torch.equal(restored[0, 0], torch.zeros(64))
    if fmt == "int8":
        assert (error <= scale.unsqueeze(-1) / 2 * (1 + 1e-6)).all()
        assert q.abs().max() <= 127
    else:
        scaled = (w / scale.unsqueeze(-1)).abs()
        normal = scaled >= 2**-6
        assert (error[normal] <= w.abs()[normal] * 2**-4 * (1 + 1e-6)).all()
        assert (error[~normal] <= (scale.unsqueeze(-1) * 2**-10 * (1 + 1e-6)).expand_as(w)[~normal]).all()


def _quantized_moe(fmt: str, seed: int, std: float, **sizes: int) -> MoE:
    """A greedy-routed MoE layer with N(0, std) weights, its experts then quantized to ``fmt``."""
    torch.manual_seed(seed)
    moe = MoE(LanguageConfig(topk_method="greedy", **sizes))
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, std)
    return quantize_experts(moe, fmt)


def _quantized_stack(fmt: str, seed: int = 0) -> tuple[StackedExperts, StackedExperts]:
    """(an 8-bit stack, a float32 stack holding exactly its dequantized weights)."""
    stack = _quantized_moe(fmt, seed, 0.1, hidden_size=64, moe_intermediate_size=48, n_routed_experts=16,
                           num_experts_per_tok=4, n_shared_experts=1).experts
    plain = StackedExperts(16, 64, 48)
    with torch.no_grad():
        plain.gate_up.copy_(stack.gate_up.float() * stack.gate_up_scale.unsqueeze(-1))
        plain.down.copy_(stack.down.float() * stack.down_scale.unsqueeze(-1))
    return stack, plain


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_path_with_8bit_experts_equals_the_dequantized_float_experts(fmt: str) -> None:
    stack, plain = _quantized_stack(fmt)
    assert stack.gate_up.element_size() == 1 and stack.gate_up_scale.dtype == torch.float32
    x = torch.randn(5, 64)
    ids = torch.stack([torch.randperm(16)[:4] for _ in range(5)])
    with torch.inference_mode():
        reference = plain.grouped(x, ids)
        for path in (stack.grouped, stack.looped, stack.fused):
            torch.testing.assert_close(path(x, ids), reference, atol=1e-5, rtol=1e-5)


@pytest.mark.slow  # torch.compile on the CPU
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("tokens", [1, 3])
def test_compiled_8bit_decode_dequantizes_inside_the_reduction(fmt: str, tokens: int) -> None:
    """Compiled, the fused path widens the 8-bit weights inside the reduction kernel: no buffer
    the size of the chosen weights (8-bit or widened) exists in the generated code."""
    from torch._inductor.utils import run_and_get_code

    stack, _ = _quantized_stack(fmt, seed=tokens)
    k = 4
    x = torch.randn(tokens, 64)
    ids = torch.stack([torch.randperm(16)[:k] for _ in range(tokens)])
    with torch.inference_mode():
        eager = stack.looped(x, ids)
        out, code = run_and_get_code(torch.compile(stack.fused, fullgraph=True, dynamic=False), x, ids)
    torch.testing.assert_close(out, eager, atol=1e-5, rtol=1e-5)
    gathered = tokens * k * 2 * 48 * 64
    largest = max(buffer_numels("\n".join(code)), default=0)
    assert largest < gathered // 4, f"a buffer of {largest} elements: the chosen weights were copied"


@pytest.mark.slow  # torch.compile on the CPU
@pytest.mark.parametrize("fmt", FORMATS)
def test_8bit_moe_layer_eager_equals_compiled(fmt: str) -> None:
    moe = _quantized_moe(fmt, 2, 0.2, hidden_size=32, moe_intermediate_size=16, n_routed_experts=8,
                         num_experts_per_tok=2, n_shared_experts=2)
    assert isinstance(moe.shared_experts.gate_proj, QuantizedLinear)
    x = torch.randn(3, 1, 32)
    with torch.inference_mode():
        eager = moe(x)
        compiled = torch.compile(moe, fullgraph=True, dynamic=False)(x)
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)


@functools.lru_cache(maxsize=None)
def _checkpoint(variant: str, root: str):
    from pathlib import Path

    return make_checkpoint(Path(root) / variant, variant=variant, seed=4)


@pytest.mark.parametrize("variant", ["tiny", "small", "base"])
def test_loaded_8bit_model_holds_the_bytes_the_sizing_rule_counts(variant: str, tmp_path_factory) -> None:
    """The sizing formula (from the config alone) equals the bytes of a loaded model in each format."""
    path = _checkpoint(variant, str(tmp_path_factory.getbasetemp()))
    for fmt in ("none", *FORMATS):
        model = load_model(path, device="cpu", dtype=torch.bfloat16, quantize=fmt)
        n_params = sum(p.numel() for p in build_on_meta(model.config).parameters())
        experts, channels = model.config.language.expert_parameters()
        loaded = sum(p.nbytes for p in model.parameters())
        assert loaded == weight_bytes(n_params, experts, channels, fmt, bytes_per_param=2), fmt
        if fmt != "none":
            layer = next(m for m in model.modules() if isinstance(m, MoE))
            assert layer.experts.gate_up.element_size() == 1
            assert layer.shared_experts is None or layer.shared_experts.up_proj.weight.element_size() == 1


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_expert_counts_are_those_of_the_published_shapes(variant: str) -> None:
    config = config_from_dict(random_config_json(variant, "real", dtype=torch.bfloat16))
    assert VARIANT_EXPERTS[variant] == config.language.expert_parameters()


def test_8bit_loading_gives_logits_close_to_float32(tmp_path_factory) -> None:
    """Random weights, checked against the same model unquantized: int8 keeps the last logits
    within 5% of their range and fp8 (3 mantissa bits) within 25% (docs/correctness.md has the
    fixture figures and the reasons)."""
    path = _checkpoint("base", str(tmp_path_factory.getbasetemp()))
    ids = torch.tensor([[0, 5, 17, 300, 42, 9, 1001, 77]])
    positions = torch.arange(ids.shape[1]).unsqueeze(0)
    with torch.inference_mode():
        reference = load_model(path, device="cpu", dtype=torch.float32).forward_tokens(ids, positions)
        for fmt, bound in (("int8", 0.05), ("fp8", 0.25)):
            logits = load_model(path, device="cpu", dtype=torch.float32, quantize=fmt).forward_tokens(ids, positions)
            assert (logits - reference).abs().max() < bound * reference.abs().max(), fmt


def test_quantize_setting_is_read_once_and_checked() -> None:
    from deepseek_vl2.engine.config import ConfigError, EngineConfig
    assert EngineConfig.from_environment({}).quantize == "auto"
    assert EngineConfig.from_environment({"DSVL2_QUANTIZE": " FP8 "}).quantize == "fp8"
    with pytest.raises(ConfigError, match=r"DSVL2_QUANTIZE \(quantize\) must be one of auto, none, int8, fp8, got 'int4'"):
        EngineConfig.from_environment({"DSVL2_QUANTIZE": "int4"})
    with pytest.raises(ConfigError, match=r"DSVL2_QUANTIZE \(quantize\) must be one of .*, got 'int4'"):
        EngineConfig(quantize="int4")


@pytest.mark.slow  # torch.compile on the CPU
@pytest.mark.parametrize("fmt", FORMATS)
def test_compiled_decode_step_with_8bit_experts_equals_eager(fmt: str, tmp_path_factory) -> None:
    """The engine's compiled decode step (engine/decode.py) runs the 8-bit fused path; its greedy
    tokens and step logits equal the eager engine's (looped 8-bit experts)."""
    from deepseek_vl2.engine.generation import Generator
    from deepseek_vl2.engine.sampling import SamplingParams
    from deepseek_vl2.engine.scheduler import BatchScheduler
    from deepseek_vl2.inputs.processor import DeepseekVL2Processor

    path = _checkpoint("small", str(tmp_path_factory.getbasetemp()))
    model = load_model(path, device="cpu", dtype=torch.float32, quantize=fmt)
    processor = DeepseekVL2Processor.from_pretrained(path)
    eager, compiled = (Generator(model, processor, compile=mode) for mode in (False, True))
    inputs = eager.prepare("Hello there, describe a cat.", [])
    params = SamplingParams(temperature=0.0, max_new_tokens=6, ignore_eos=True, stop=())
    runs = []
    for generator in (eager, compiled):
        with BatchScheduler(generator) as scheduler:
            request = scheduler.run(inputs, params, record_logits=True)
        runs.append((request.tokens, torch.stack(request.step_logits)))
    (eager_tokens, eager_logits), (tokens, logits) = runs
    assert tokens == eager_tokens
    torch.testing.assert_close(logits, eager_logits, atol=1e-4, rtol=1e-4)

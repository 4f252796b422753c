"""Write a random-weight DeepSeek-VL2 checkpoint in the official Hugging Face on-disk layout.

The output folder looks like the published repos (deepseek-ai/deepseek-vl2-tiny, -small,
deepseek-vl2): ``config.json`` (model_type ``deepseek_vl_v2`` with nested vision / projector /
language configs), ``processor_config.json``, ``model.safetensors`` or numbered shards plus
``model.safetensors.index.json``, and a small locally trained byte-level BPE tokenizer that
carries the real special tokens. Weights are random but well scaled, drawn tensor by tensor
on the CPU from a generator seeded by (seed, tensor name), so the values do not depend on the
number of shards and at most one shard is held in memory.

    python -m tools.checkpoints OUT_DIR --variant tiny [--size reduced|real]
        [--shards N] [--dtype float32|bfloat16] [--seed S] [--eos-boost F] [--yarn-factor F]
        [--layers N] [--hidden-size D] [--experts E] [--vision-layers N] [--vision-width W]
        [--set language_key=json_value ...]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

VARIANTS = ("tiny", "small", "base")
SIZES = ("reduced", "real")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

BOS, EOS, PAD = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"
EXTRA_SPECIAL_TOKENS = ["<image>", "<|ref|>", "<|/ref|>", "<|det|>", "<|/det|>",
                        "<|grounding|>", "<|User|>", "<|Assistant|>"]
BPE_VOCAB_SIZE = 1400          # ids 0..1399 in the BPE model, then the 8 extra special tokens
REAL_VOCAB_SIZE = 129280
EOS_ID = 1

# The 23 (width, height) tile layouts of the real processor / config files, in their order.
CANDIDATE_RESOLUTIONS = [
    [384, 384], [384, 768], [768, 384], [384, 1152], [1152, 384], [384, 1536], [1536, 384],
    [768, 768], [384, 1920], [1920, 384], [384, 2304], [2304, 384], [768, 1152], [1152, 768],
    [384, 2688], [2688, 384], [384, 3072], [3072, 384], [768, 1536], [1536, 768],
    [384, 3456], [3456, 384], [1152, 1152],
]

VISION_MLP_RATIO = 3.7362
VISION_PATCH = 14
VISION_POSITIONS = (384 // VISION_PATCH) ** 2      # 729
OFFICIAL_VISION_HEADS = 16                         # VisionEncoderConfig default
OFFICIAL_PROJECTOR_INPUT_DIM = 1152                # MlpProjectorConfig default
# DeepseekV2Config defaults that the real base config.json leaves out; omitted here when equal.
OMITTED_WHEN_DEFAULT = {"num_hidden_layers": 30, "num_attention_heads": 32,
                        "num_key_value_heads": 32}

# Language dimensions per (size, variant). Real ones from the published config files.
LANGUAGE_DIMS: dict[str, dict[str, dict[str, Any]]] = {
    "reduced": {
        "tiny": dict(hidden_size=64, intermediate_size=160, moe_intermediate_size=48,
                     num_attention_heads=4, num_key_value_heads=4, num_hidden_layers=3,
                     n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=2),
        "small": dict(hidden_size=64, intermediate_size=192, moe_intermediate_size=40,
                      num_attention_heads=4, num_key_value_heads=4, num_hidden_layers=3,
                      kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                      n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=2),
        "base": dict(hidden_size=96, intermediate_size=256, moe_intermediate_size=32,
                     num_attention_heads=4, num_key_value_heads=4, num_hidden_layers=3,
                     kv_lora_rank=24, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12,
                     n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=2),
    },
    "real": {
        "tiny": dict(hidden_size=1280, intermediate_size=6848, moe_intermediate_size=896,
                     num_attention_heads=10, num_key_value_heads=10, num_hidden_layers=12,
                     n_routed_experts=64, num_experts_per_tok=6, n_shared_experts=2,
                     vocab_size=REAL_VOCAB_SIZE),
        "small": dict(hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
                      num_attention_heads=16, num_key_value_heads=16, num_hidden_layers=27,
                      kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
                      v_head_dim=128, n_routed_experts=64, num_experts_per_tok=6,
                      n_shared_experts=2, vocab_size=REAL_VOCAB_SIZE),
        "base": dict(hidden_size=2560, intermediate_size=12288, moe_intermediate_size=1536,
                     num_attention_heads=32, num_key_value_heads=32, num_hidden_layers=30,
                     kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
                     v_head_dim=128, n_routed_experts=72, num_experts_per_tok=6,
                     n_shared_experts=2, vocab_size=REAL_VOCAB_SIZE),
    },
}
VISION_DIMS = {"reduced": dict(width=64, layers=2, heads=4),
               "real": dict(width=1152, layers=27, heads=16)}

# Structural keys per variant, written the way the real files write them.
LANGUAGE_STRUCTURE: dict[str, dict[str, Any]] = {
    "tiny": dict(use_mla=False, q_lora_rank=None, kv_lora_rank=None, qk_nope_head_dim=0,
                 qk_rope_head_dim=0, v_head_dim=0, topk_method="greedy", n_group=1,
                 topk_group=1, lm_head=True),
    "small": dict(q_lora_rank=None, topk_method="greedy", n_group=1, topk_group=1,
                  lm_head=False),
    "base": dict(q_lora_rank=None, topk_method="noaux_tc", scoring_func="sigmoid",
                 norm_topk_prob=True, routed_scaling_factor=2.0, n_group=1, topk_group=1,
                 lm_head=False),
}
LANGUAGE_COMMON: dict[str, Any] = {
    "architectures": ["DeepseekV2ForCausalLM"],
    "auto_map": {
        "AutoConfig": "configuration_deepseek.DeepseekV2Config",
        "AutoModel": "modeling_deepseek.DeepseekV2Model",
        "AutoModelForCausalLM": "modeling_deepseek.DeepseekV2ForCausalLM",
    },
    "bos_token_id": 0,
    "eos_token_id": EOS_ID,
    "first_k_dense_replace": 1,
    "max_position_embeddings": 4096,
    "model_type": "deepseek_v2",
    "rm_head": False,
}
# Language-config keys a caller may override directly (besides the aliases below).
LANGUAGE_OVERRIDABLE = {
    "hidden_size", "intermediate_size", "moe_intermediate_size", "num_attention_heads",
    "num_key_value_heads", "num_hidden_layers", "n_routed_experts", "num_experts_per_tok",
    "n_shared_experts", "kv_lora_rank", "q_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
    "v_head_dim", "n_group", "topk_group", "first_k_dense_replace", "moe_layer_freq",
    "vocab_size", "max_position_embeddings", "rope_theta", "rms_norm_eps",
    "routed_scaling_factor", "norm_topk_prob", "scoring_func", "topk_method", "use_mla",
}
ALIASES = {"layers": "num_hidden_layers", "experts": "n_routed_experts",
           "heads": "num_attention_heads"}
VISION_ALIASES = {"vision_layers": "layers", "vision_width": "width", "vision_heads": "heads"}


# --------------------------------------------------------------------------- configuration

@dataclass
class CheckpointPlan:
    """Everything needed to write one checkpoint: the three nested configs and generation knobs."""
    language: dict[str, Any]       # language_config as written (sparse like the real files)
    vision: dict[str, Any]         # width / layers / heads actually used
    dtype: torch.dtype
    seed: int
    eos_boost: float

    def get(self, key: str, default: Any = None) -> Any:
        """Read a language-config value, falling back to the official DeepseekV2Config default."""
        defaults = {"num_hidden_layers": 30, "num_attention_heads": 32,
                    "num_key_value_heads": 32, "use_mla": True, "moe_layer_freq": 1,
                    "topk_method": "gready"}
        return self.language.get(key, defaults.get(key, default))


def build_plan(variant: str, size: str, vocab_size: int, dtype: torch.dtype, seed: int,
               overrides: dict[str, Any]) -> CheckpointPlan:
    """Resolve variant + size + overrides into the configs to write; raise ValueError if invalid."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    overrides = dict(overrides)
    eos_boost = overrides.pop("eos_boost", None)
    eos_boost = 1.0 if eos_boost is None else float(eos_boost)
    yarn_factor = overrides.pop("yarn_factor", None)

    language: dict[str, Any] = {**LANGUAGE_COMMON, "vocab_size": vocab_size,
                                **LANGUAGE_DIMS[size][variant], **LANGUAGE_STRUCTURE[variant]}
    vision = dict(VISION_DIMS[size])
    for key, value in overrides.items():
        if value is None and key not in ("q_lora_rank", "kv_lora_rank"):
            continue                       # an unset CLI option
        if key in VISION_ALIASES:
            vision[VISION_ALIASES[key]] = int(value)
        elif key in ALIASES or key in LANGUAGE_OVERRIDABLE:
            name = ALIASES.get(key, key)
            language[name] = value
            if name == "num_attention_heads" and "num_key_value_heads" not in overrides:
                language["num_key_value_heads"] = value
        else:
            allowed = sorted(LANGUAGE_OVERRIDABLE | set(ALIASES) | set(VISION_ALIASES)
                             | {"eos_boost", "yarn_factor"})
            raise ValueError(f"unknown override {key!r}; allowed: {', '.join(allowed)}")

    if yarn_factor is not None:
        original = int(language["max_position_embeddings"])
        language["rope_scaling"] = {
            "type": "yarn", "factor": float(yarn_factor),
            "original_max_position_embeddings": original,
            "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707}
        language["max_position_embeddings"] = int(original * float(yarn_factor))
    for key, default in OMITTED_WHEN_DEFAULT.items():
        if language.get(key) == default:
            del language[key]
    language["torch_dtype"] = _dtype_name(dtype)
    plan = CheckpointPlan(language, vision, dtype, seed, eos_boost)
    _validate(plan)
    return plan


def _validate(plan: CheckpointPlan) -> None:
    """Reject dimension combinations the official model could not be built with."""
    hidden, heads = plan.get("hidden_size"), plan.get("num_attention_heads")
    if not plan.get("use_mla") and hidden % heads:
        raise ValueError(f"hidden_size {hidden} is not divisible by num_attention_heads {heads}")
    if plan.vision["width"] % plan.vision["heads"]:
        raise ValueError(f"vision width {plan.vision['width']} is not divisible by "
                         f"vision heads {plan.vision['heads']}")
    experts, top_k = plan.get("n_routed_experts"), plan.get("num_experts_per_tok")
    if top_k > experts:
        raise ValueError(f"num_experts_per_tok {top_k} > n_routed_experts {experts}")
    if experts % plan.get("n_group", 1):
        raise ValueError(f"n_routed_experts {experts} is not divisible by n_group")
    if plan.get("num_hidden_layers") < 1:
        raise ValueError("num_hidden_layers must be >= 1")


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "float32", torch.bfloat16: "bfloat16"}[dtype]


def model_config_json(plan: CheckpointPlan) -> dict[str, Any]:
    """The top-level config.json dict: official deepseek_vl_v2 schema, sparse like real files."""
    vision: dict[str, Any] = {
        "layers": plan.vision["layers"], "mlp_ratio": VISION_MLP_RATIO,
        "model_name": "siglip_so400m_patch14_384", "model_type": "vision",
        "patch_size": VISION_PATCH, "width": plan.vision["width"]}
    if plan.vision["heads"] != OFFICIAL_VISION_HEADS:
        vision["heads"] = plan.vision["heads"]
    projector: dict[str, Any] = {"model_type": "mlp_projector",
                                 "n_embed": plan.language["hidden_size"]}
    if plan.vision["width"] != OFFICIAL_PROJECTOR_INPUT_DIM:
        projector["input_dim"] = plan.vision["width"]
    return {
        "candidate_resolutions": CANDIDATE_RESOLUTIONS,
        "global_view_pos": "head",
        "language_config": plan.language,
        "model_type": "deepseek_vl_v2",
        "projector_config": projector,
        "tile_tag": "2D",
        "torch_dtype": _dtype_name(plan.dtype),
        "transformers_version": "4.38.2",
        "vision_config": vision,
    }


def processor_config_json() -> dict[str, Any]:
    """processor_config.json as the real repos ship it."""
    return {
        "add_special_token": False, "candidate_resolutions": CANDIDATE_RESOLUTIONS,
        "downsample_ratio": 2, "ignore_id": -100, "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5], "image_token": "<image>", "mask_prompt": False,
        "normalize": True, "pad_token": PAD, "patch_size": VISION_PATCH,
        "processor_class": "DeepseekVLV2Processor", "sft_format": "deepseek",
    }


# --------------------------------------------------------------------------- weights

@dataclass(frozen=True)
class TensorSpec:
    """One state-dict entry: its key, shape and how its random values are scaled."""
    key: str
    shape: tuple[int, ...]
    init: str      # linear | norm | bias | embed | head | pos | vector | score_bias | latent

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _linear(specs: list[TensorSpec], key: str, out_dim: int, in_dim: int,
            bias: bool = False, head: bool = False) -> None:
    specs.append(TensorSpec(f"{key}.weight", (out_dim, in_dim), "head" if head else "linear"))
    if bias:
        specs.append(TensorSpec(f"{key}.bias", (out_dim,), "bias"))


def _layer_norm(specs: list[TensorSpec], key: str, dim: int) -> None:
    specs.append(TensorSpec(f"{key}.weight", (dim,), "norm"))
    specs.append(TensorSpec(f"{key}.bias", (dim,), "bias"))


def _vision_specs(width: int, layers: int) -> list[TensorSpec]:
    """timm ViT (SigLIP so400m layout) incl. the unused attention-pooling head, prefix vision."""
    mlp = int(width * VISION_MLP_RATIO)
    specs = [TensorSpec("vision.patch_embed.proj.weight", (width, 3, VISION_PATCH, VISION_PATCH),
                        "linear"),
             TensorSpec("vision.patch_embed.proj.bias", (width,), "bias"),
             TensorSpec("vision.pos_embed", (1, VISION_POSITIONS, width), "pos")]
    for i in range(layers):
        block = f"vision.blocks.{i}"
        _layer_norm(specs, f"{block}.norm1", width)
        _linear(specs, f"{block}.attn.qkv", 3 * width, width, bias=True)
        _linear(specs, f"{block}.attn.proj", width, width, bias=True)
        _layer_norm(specs, f"{block}.norm2", width)
        _linear(specs, f"{block}.mlp.fc1", mlp, width, bias=True)
        _linear(specs, f"{block}.mlp.fc2", width, mlp, bias=True)
    _layer_norm(specs, "vision.norm", width)
    specs.append(TensorSpec("vision.attn_pool.latent", (1, 1, width), "latent"))
    _linear(specs, "vision.attn_pool.q", width, width, bias=True)
    _linear(specs, "vision.attn_pool.kv", 2 * width, width, bias=True)
    _linear(specs, "vision.attn_pool.proj", width, width, bias=True)
    _layer_norm(specs, "vision.attn_pool.norm", width)
    _linear(specs, "vision.attn_pool.mlp.fc1", mlp, width, bias=True)
    _linear(specs, "vision.attn_pool.mlp.fc2", width, mlp, bias=True)
    return specs


def _attention_specs(plan: CheckpointPlan, prefix: str) -> list[TensorSpec]:
    """Plain Llama-style attention (use_mla false) or MLA, with or without q-LoRA."""
    specs: list[TensorSpec] = []
    hidden, heads = plan.get("hidden_size"), plan.get("num_attention_heads")
    if not plan.get("use_mla"):
        head_dim = hidden // heads
        kv_dim = plan.get("num_key_value_heads") * head_dim
        _linear(specs, f"{prefix}.q_proj", heads * head_dim, hidden)
        _linear(specs, f"{prefix}.k_proj", kv_dim, hidden)
        _linear(specs, f"{prefix}.v_proj", kv_dim, hidden)
        _linear(specs, f"{prefix}.o_proj", hidden, heads * head_dim)
        return specs
    nope, rope = plan.get("qk_nope_head_dim"), plan.get("qk_rope_head_dim")
    v_dim, kv_rank = plan.get("v_head_dim"), plan.get("kv_lora_rank")
    q_rank = plan.get("q_lora_rank")
    if q_rank is None:
        _linear(specs, f"{prefix}.q_proj", heads * (nope + rope), hidden)
    else:
        _linear(specs, f"{prefix}.q_a_proj", q_rank, hidden)
        specs.append(TensorSpec(f"{prefix}.q_a_layernorm.weight", (q_rank,), "norm"))
        _linear(specs, f"{prefix}.q_b_proj", heads * (nope + rope), q_rank)
    _linear(specs, f"{prefix}.kv_a_proj_with_mqa", kv_rank + rope, hidden)
    specs.append(TensorSpec(f"{prefix}.kv_a_layernorm.weight", (kv_rank,), "norm"))
    _linear(specs, f"{prefix}.kv_b_proj", heads * (nope + v_dim), kv_rank)
    _linear(specs, f"{prefix}.o_proj", hidden, heads * v_dim)
    return specs


def _swiglu(specs: list[TensorSpec], prefix: str, hidden: int, inner: int) -> None:
    _linear(specs, f"{prefix}.gate_proj", inner, hidden)
    _linear(specs, f"{prefix}.up_proj", inner, hidden)
    _linear(specs, f"{prefix}.down_proj", hidden, inner)


def _is_moe_layer(plan: CheckpointPlan, index: int) -> bool:
    """The official rule: routed experts exist, index >= first_k_dense_replace, freq divides."""
    return (plan.get("n_routed_experts") is not None
            and index >= plan.get("first_k_dense_replace", 0)
            and index % plan.get("moe_layer_freq") == 0)


def _language_specs(plan: CheckpointPlan) -> list[TensorSpec]:
    """DeepSeek-V2 decoder, prefix language."""
    hidden, vocab = plan.get("hidden_size"), plan.get("vocab_size")
    specs = [TensorSpec("language.model.embed_tokens.weight", (vocab, hidden), "embed")]
    for i in range(plan.get("num_hidden_layers")):
        layer = f"language.model.layers.{i}"
        specs.append(TensorSpec(f"{layer}.input_layernorm.weight", (hidden,), "norm"))
        specs += _attention_specs(plan, f"{layer}.self_attn")
        specs.append(TensorSpec(f"{layer}.post_attention_layernorm.weight", (hidden,), "norm"))
        if not _is_moe_layer(plan, i):
            _swiglu(specs, f"{layer}.mlp", hidden, plan.get("intermediate_size"))
            continue
        experts, inner = plan.get("n_routed_experts"), plan.get("moe_intermediate_size")
        _linear(specs, f"{layer}.mlp.gate", experts, hidden, head=True)
        if plan.get("topk_method") == "noaux_tc":
            specs.append(TensorSpec(f"{layer}.mlp.gate.e_score_correction_bias", (experts,),
                                    "score_bias"))
        for e in range(experts):
            _swiglu(specs, f"{layer}.mlp.experts.{e}", hidden, inner)
        if plan.get("n_shared_experts"):
            _swiglu(specs, f"{layer}.mlp.shared_experts", hidden,
                    inner * plan.get("n_shared_experts"))
    specs.append(TensorSpec("language.model.norm.weight", (hidden,), "norm"))
    _linear(specs, "language.lm_head", vocab, hidden, head=True)
    return specs


def tensor_specs(plan: CheckpointPlan) -> list[TensorSpec]:
    """Every key of the official DeepseekVLV2ForCausalLM state dict, in a stable order."""
    hidden, width = plan.get("hidden_size"), plan.vision["width"]
    specs = _vision_specs(width, plan.vision["layers"])
    _linear(specs, "projector.layers.0", hidden, width * 4, bias=True)   # 2x2-merged patches
    _linear(specs, "projector.layers.2", hidden, hidden, bias=True)
    specs.append(TensorSpec("image_newline", (hidden,), "vector"))
    specs.append(TensorSpec("view_seperator", (hidden,), "vector"))      # sic, official spelling
    return specs + _language_specs(plan)


def init_scale(init: str, shape: tuple[int, ...], hidden: int) -> tuple[float, float]:
    """(scale, offset) of a random tensor of kind ``init``: its values are offset + scale·N(0, 1).

    The one rule for random weights (the test checkpoints here, tools/random_model.py on a device):
    linear weights N(0, 1/fan_in) (stacked experts [.., out, in] and the patch convolution
    [out, c, kh, kw] too), norms 1 + 0.2·N, biases 0.05·N, embeddings and vectors N(0, 1), lm_head
    and MoE gates N(0, 4/hidden), position embedding 0.3·N, score-correction bias 0.1·N."""
    if init in ("linear", "latent"):
        fan_in = math.prod(shape[1:]) if len(shape) == 4 else shape[-1]
        return 1.0 / math.sqrt(fan_in), 0.0
    scales = {"head": (2.0 / math.sqrt(hidden), 0.0), "norm": (0.2, 1.0), "bias": (0.05, 0.0),
              "pos": (0.3, 0.0), "score_bias": (0.1, 0.0), "embed": (1.0, 0.0), "vector": (1.0, 0.0)}
    if init not in scales:
        raise ValueError(f"unknown init kind {init!r}")
    return scales[init]


def make_tensor(spec: TensorSpec, plan: CheckpointPlan) -> torch.Tensor:
    """Draw one tensor from N(0,1) seeded by (seed, key), scale it (:func:`init_scale`), apply the
    eos boost, cast."""
    generator = torch.Generator().manual_seed(
        (plan.seed * 0x9E3779B1 + zlib.crc32(spec.key.encode())) % (2 ** 63))
    values = torch.randn(spec.shape, generator=generator, dtype=torch.float32)
    scale, offset = init_scale(spec.init, spec.shape, plan.get("hidden_size"))
    values = values.mul_(scale).add_(offset)
    if spec.key == "language.lm_head.weight" and plan.eos_boost != 1.0:
        values[EOS_ID] *= plan.eos_boost
    return values.to(plan.dtype)


def split_into_shards(specs: list[TensorSpec], shards: int, element_size: int
                      ) -> list[list[TensorSpec]]:
    """Split in order into `shards` non-empty, roughly equal-byte groups."""
    if not 1 <= shards <= len(specs):
        raise ValueError(f"shards must be between 1 and {len(specs)}, got {shards}")
    groups: list[list[TensorSpec]] = []
    remaining = sum(s.numel for s in specs) * element_size
    index = 0
    for k in range(shards):
        left_shards = shards - k
        target = remaining / left_shards
        group, size = [specs[index]], specs[index].numel * element_size
        index += 1
        while (index < len(specs) - (left_shards - 1)
               and (left_shards == 1 or size + specs[index].numel * element_size <= target)):
            size += specs[index].numel * element_size
            group.append(specs[index])
            index += 1
        groups.append(group)
        remaining -= size
    return groups


def write_weights(out_dir: Path, plan: CheckpointPlan, shards: int, workers: int = 1
                  ) -> dict[str, Any]:
    """Write model.safetensors (shards == 1) or shards + index; return a small summary.

    Tensors of a shard are drawn by `workers` threads (torch releases the GIL; every tensor has
    its own generator, so the values do not depend on the thread count).
    """
    stale = [*out_dir.glob("model*.safetensors"), out_dir / "model.safetensors.index.json"]
    for path in stale:                              # left over from an earlier run
        path.unlink(missing_ok=True)
    specs = tensor_specs(plan)
    element_size = torch.tensor([], dtype=plan.dtype).element_size()
    total_size = sum(s.numel for s in specs) * element_size
    groups = split_into_shards(specs, shards, element_size)
    names = (["model.safetensors"] if shards == 1 else
             [f"model-{k + 1:05d}-of-{shards:05d}.safetensors" for k in range(shards)])
    weight_map: dict[str, str] = {}
    for name, group in zip(names, groups):
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            tensors = dict(zip((spec.key for spec in group),
                               pool.map(lambda spec: make_tensor(spec, plan), group)))
        save_file(tensors, str(out_dir / name), metadata={"format": "pt"})
        (out_dir / name).chmod(0o644)               # safetensors creates files 0600
        del tensors
        weight_map.update({spec.key: name for spec in group})
    if shards > 1:
        index = {"metadata": {"total_size": total_size},
                 "weight_map": dict(sorted(weight_map.items()))}
        _write_json(out_dir / "model.safetensors.index.json", index)
    return {"tensors": len(specs), "parameters": sum(s.numel for s in specs),
            "bytes": total_size, "files": names}


# --------------------------------------------------------------------------- tokenizer

# A small original corpus: enough distinct English words for ~1100 BPE merges, prompt-like
# phrasing, numbers and boxes, plus some Chinese / Japanese / emoji so that frequent multi-byte
# characters get their own tokens while rare ones are split across byte tokens.
TOKENIZER_CORPUS = """\
Describe the image in detail. What is shown in this picture? Where is the red square?
The picture shows a small green square on a white background, next to a blue circle.
A yellow triangle sits in the upper left corner, and a black line crosses the bottom half.
There are three images: the first one is a photograph of a cat sleeping on a wooden chair,
the second one is a drawing of a house with a tall chimney, and the third one is a chart.
The chart compares the monthly sales of four stores during the year 2023.
Please locate the object in the image and give its bounding box coordinates.
The dog is at [[120, 340, 560, 890]] and the ball is at [[600, 712, 701, 815]].
Find the person wearing a hat. Count the windows on the building. Read the text on the sign.
The sign says: "Open every day from 9 to 17, closed on public holidays."
This is a table with columns for name, age, city and occupation; it has twelve rows.
Answer the question using a single word or phrase. Explain your reasoning step by step.
Optical character recognition turns printed or handwritten characters into machine text.
A vision language model reads pictures and words together, then writes a helpful answer.
Mixture of experts layers route every token to a few specialists instead of the whole network.
The quick brown fox jumps over the lazy dog while the farmer watches from the wooden gate.
Early in the morning the market opens, and traders arrange oranges, apples, pears and grapes.
Rain fell steadily through the night; by dawn the river had risen above the old stone bridge.
She opened the window, listened to the birds, and decided to walk to the library instead.
The museum keeps paintings, sculptures, ancient coins, maps, clocks and musical instruments.
Engineers measured the temperature, pressure and humidity every hour for seven weeks.
Children played football in the park until the streetlights came on and their parents called.
My grandmother bakes bread on Sundays: flour, water, salt, yeast and a great deal of patience.
The train to the coast leaves at half past eight and arrives shortly before noon.
Mountains, valleys, forests, deserts, oceans, islands, glaciers and volcanoes shape the planet.
He wrote a short letter, folded it twice, sealed the envelope and posted it at the corner.
The orchestra tuned their violins, cellos, flutes, trumpets and drums before the concert.
Doctors recommend drinking water, sleeping enough, eating vegetables and exercising often.
Our team finished the project on time, although the final week was rather stressful.
Numbers such as 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 42, 100, 256, 1024 and 65536 appear often.
Prices rose by 3.5 percent, while wages grew by only 2.1 percent over the same period.
Can you summarize the document? What color is the car? How many people are in the room?
Is there a cup on the table? Which animal is the largest? Why is the sky blue?
Thank you! You're welcome. Certainly, here is the answer. I'm not sure, but I think so.
The scientist carefully recorded each observation in a notebook with numbered pages.
Bicycles, buses, trams, ferries and airplanes connect the neighbourhoods of the city.
A gentle breeze moved the curtains, carrying the scent of jasmine and freshly cut grass.
The software update improves performance, fixes several bugs and adds a dark theme.
Farmers harvest wheat, barley, corn and rice when the grain is ripe and dry.
The lighthouse keeper climbed the spiral staircase every evening to light the lamp.
Students asked thoughtful questions about history, geography, physics and literature.
The kitchen smelled of garlic, onions, tomatoes, basil and slowly simmering soup.
Winter arrived early that year, covering roofs, fences and gardens with thick snow.
Please write a poem about the sea. Translate this sentence into French. Continue the story.
def add(a, b): return a + b  # a tiny function with a comment
for i in range(10): print(i * i)
{"name": "square", "color": "green", "size": [40, 40]}
这是一张图片。图片中有一只猫和一只狗。请描述这张图片的内容。
红色的正方形在左边，蓝色的圆形在右边。天空是蓝色的，草地是绿色的。
我们今天去公园散步，天气很好，阳光明媚。
これは写真です。猫が椅子の上で寝ています。ありがとうございます。
今日はいい天気ですね。駅まで歩いて行きます。
😀 😀 😀 🙂 🙂 👍 👍 ❤️ ❤️ 🎉 🐱 🐶 🌟 ☀️ 🌧️
Great job 👍! I love it ❤️. Party time 🎉🎉. Smile 😀 and relax 🙂.
"""


def build_tokenizer():
    """Train the byte-level BPE tokenizer (deterministic) and add the DeepSeek-VL2 specials."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers
    from tokenizers import pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE(unk_token=None, byte_fallback=False, fuse_unk=False))
    tokenizer.normalizer = normalizers.Sequence([])
    words = (r"[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\s?[^\s\p{L}\p{N}]+[\r\n]*"
             r"|\s*[\r\n]+|\s+(?!\S)|\s+")
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\p{N}{1,3}"), behavior="isolated"),        # digit runs <= 3
        pre_tokenizers.Split(Regex("[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+"),
                             behavior="isolated"),                               # CJK runs
        pre_tokenizers.Split(Regex(words), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE, min_frequency=1, show_progress=False,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in (BOS, EOS, PAD)],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(TOKENIZER_CORPUS.splitlines(), trainer=trainer)
    tokenizer.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in EXTRA_SPECIAL_TOKENS])
    tokenizer.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B:1")
    return tokenizer


def write_tokenizer(out_dir: Path) -> int:
    """Write tokenizer.json, tokenizer_config.json, special_tokens_map.json; return its length."""
    tokenizer = build_tokenizer()
    tokenizer.save(str(out_dir / "tokenizer.json"))
    ids = {t: tokenizer.token_to_id(t) for t in [BOS, EOS, PAD, *EXTRA_SPECIAL_TOKENS]}
    assert [ids[BOS], ids[EOS], ids[PAD]] == [0, 1, 2], ids
    decoder = {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                        "single_word": False, "special": True} for t, i in ids.items()}
    special_map = {"additional_special_tokens": EXTRA_SPECIAL_TOKENS, "bos_token": BOS,
                   "eos_token": EOS, "pad_token": PAD}
    tokenizer_config = {
        "add_bos_token": False, "add_eos_token": False, "added_tokens_decoder": decoder,
        **special_map, "clean_up_tokenization_spaces": False, "legacy": True,
        "model_max_length": 16384, "tokenizer_class": "LlamaTokenizerFast",
        "unk_token": None, "use_default_system_prompt": False}
    _write_json(out_dir / "tokenizer_config.json", tokenizer_config)
    _write_json(out_dir / "special_tokens_map.json", special_map)
    return tokenizer.get_vocab_size(with_added_tokens=True)


# --------------------------------------------------------------------------- entry points

def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n",
                    encoding="utf-8")


def default_shards(plan: CheckpointPlan, max_shard_bytes: float = 5e9) -> int:
    """1 for small checkpoints, else enough shards of <= ~5 GB (like the published repos)."""
    element_size = torch.tensor([], dtype=plan.dtype).element_size()
    total = sum(s.numel for s in tensor_specs(plan)) * element_size
    return max(1, math.ceil(total / max_shard_bytes))


def make_checkpoint(out_dir: str | Path, variant: str = "tiny", size: str = "reduced",
                    shards: int | None = 1, dtype: torch.dtype | str = torch.float32,
                    seed: int = 0, workers: int | None = None, **overrides: Any) -> Path:
    """Write a random-weight checkpoint folder and return its path (see `write_checkpoint`)."""
    write_checkpoint(out_dir, variant, size, shards, dtype, seed, workers, **overrides)
    return Path(out_dir)


def write_checkpoint(out_dir: str | Path, variant: str = "tiny", size: str = "reduced",
                     shards: int | None = 1, dtype: torch.dtype | str = torch.float32,
                     seed: int = 0, workers: int | None = None, **overrides: Any
                     ) -> dict[str, Any]:
    """Write a random-weight checkpoint folder; return a summary (tensors, parameters, files).

    `overrides` may set language-config keys (e.g. ``hidden_size=32``, ``q_lora_rank=16``,
    ``vocab_size=2048``), the aliases ``layers`` / ``experts`` / ``heads``, the vision sizes
    ``vision_layers`` / ``vision_width`` / ``vision_heads``, ``eos_boost`` (multiplies the eos
    row of lm_head) and ``yarn_factor`` (adds a yarn ``rope_scaling``). ``shards=None`` picks
    one file for reduced sizes and ~5 GB shards for big ones. `workers` threads draw
    the tensors (default: up to 8, one per CPU); it never changes the values.
    """
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
        dtype = DTYPES[dtype]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer_len = write_tokenizer(out)
    vocab = (tokenizer_len // 32 + 1) * 32          # a little larger than the tokenizer
    plan = build_plan(variant, size, vocab, dtype, seed, overrides)
    if plan.get("vocab_size") < tokenizer_len:
        raise ValueError(f"vocab_size {plan.get('vocab_size')} < tokenizer length {tokenizer_len}")
    _write_json(out / "config.json", model_config_json(plan))
    _write_json(out / "processor_config.json", processor_config_json())
    if workers is None:
        workers = min(8, os.cpu_count() or 1)
    summary = write_weights(out, plan, default_shards(plan) if shards is None else shards,
                            workers)
    summary["tokenizer_len"] = tokenizer_len
    return summary


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--variant", choices=VARIANTS, default="tiny")
    parser.add_argument("--size", choices=SIZES, default="reduced",
                        help="reduced: widths ~64 for fast tests; real: the published sizes")
    parser.add_argument("--shards", type=int, default=None,
                        help="number of safetensors files (default: 1, or ~5 GB each when big)")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=None,
                        help="threads drawing tensors (default: up to 8); values do not change")
    parser.add_argument("--eos-boost", type=float, default=1.0,
                        help="multiply the eos row of lm_head (random models then stop sometimes)")
    parser.add_argument("--yarn-factor", type=float, default=None,
                        help="add a DeepSeek-V2 style yarn rope_scaling with this factor")
    parser.add_argument("--layers", type=int, help="num_hidden_layers of the language model")
    parser.add_argument("--hidden-size", type=int)
    parser.add_argument("--experts", type=int, help="n_routed_experts")
    parser.add_argument("--vision-layers", type=int)
    parser.add_argument("--vision-width", type=int)
    parser.add_argument("--vision-heads", type=int)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                        help="override any language_config key, e.g. --set q_lora_rank=32")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    args = parse_args(argv)
    overrides: dict[str, Any] = {
        "eos_boost": args.eos_boost, "yarn_factor": args.yarn_factor, "layers": args.layers,
        "hidden_size": args.hidden_size, "experts": args.experts,
        "vision_layers": args.vision_layers, "vision_width": args.vision_width,
        "vision_heads": args.vision_heads}
    for item in args.set:
        key, sep, raw = item.partition("=")
        if not sep:
            raise SystemExit(f"--set expects KEY=JSON, got {item!r}")
        try:
            overrides[key] = json.loads(raw)
        except json.JSONDecodeError:
            overrides[key] = raw                      # bare strings such as greedy
    try:
        summary = write_checkpoint(args.out_dir, args.variant, args.size, args.shards,
                                   DTYPES[args.dtype], args.seed, args.workers, **overrides)
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    print(f"wrote {args.out_dir}: {summary['tensors']} tensors, "
          f"{summary['parameters']:,} parameters, "
          f"{summary['bytes'] / 1e9:.3f} GB in {len(summary['files'])} file(s), "
          f"tokenizer {summary['tokenizer_len']} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())

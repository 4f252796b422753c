"""Random weights of a DeepSeek-VL2 variant's shape, drawn directly on the device (no files).

The benchmark and the GPU check time real shapes without writing a checkpoint (the base model is
55 GB; the GPU machine has 64 GiB of disk). The configuration is the one
``tools/checkpoints.py`` writes (the published shapes for ``size="real"``), the
tokenizer is its small trained test tokenizer (written, with the two JSON configs, to a small
folder for the processor), and every parameter is drawn on the device with the scales of the
test checkpoints (``tools.checkpoints.init_scale``, the one rule).

    model, processor = build_random_model("tiny", torch.device("cuda"), torch.bfloat16)
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from deepseek_vl2.inputs.processor import DeepseekVL2Processor
from deepseek_vl2.model.checkpoint import build_on_meta
from deepseek_vl2.model.config import config_from_dict
from deepseek_vl2.model.multimodal import DeepseekVL2
from deepseek_vl2.model.norm import RMSNorm
from tools.checkpoints import (
    build_plan,
    init_scale,
    model_config_json,
    processor_config_json,
    write_tokenizer,
)

# The official benchmark builds small with the 102400-token vocabulary (shared facts sheet).
VOCAB_OVERRIDES = {("real", "small"): 102400}


def random_config_json(variant: str, size: str = "real", layers: Optional[int] = None,
                       vision_layers: Optional[int] = None, dtype: torch.dtype = torch.bfloat16) -> dict[str, Any]:
    """config.json of a variant at its published (``real``) or reduced shapes, optionally shortened."""
    vocab = VOCAB_OVERRIDES.get((size, variant), 1440)
    overrides: dict[str, Any] = {"layers": layers, "vision_layers": vision_layers, "eos_boost": 0.0}
    if (size, variant) in VOCAB_OVERRIDES:
        overrides["vocab_size"] = vocab
    plan = build_plan(variant, size, vocab, dtype, seed=0, overrides=overrides)
    return model_config_json(plan)


def write_processor_files(folder: Path, config_json: dict[str, Any]) -> Path:
    """config.json, processor_config.json and the test tokenizer: what the processor reads (no weights)."""
    folder.mkdir(parents=True, exist_ok=True)
    write_tokenizer(folder)
    (folder / "config.json").write_text(json.dumps(config_json, indent=2))
    (folder / "processor_config.json").write_text(json.dumps(processor_config_json(), indent=2))
    return folder


def _norm_parameter_names(model: nn.Module) -> set[str]:
    names = set()
    for module_name, module in model.named_modules():
        if isinstance(module, (nn.LayerNorm, RMSNorm)):
            names.add(f"{module_name}.weight")
    return names


def init_kind(name: str, is_norm: bool) -> str:
    """The :func:`tools.checkpoints.init_scale` kind of one of our model's parameters."""
    if is_norm:
        return "norm"
    if name.endswith("e_score_correction_bias"):
        return "score_bias"
    if name.endswith("bias"):
        return "bias"
    if name.endswith("embed_tokens.weight"):
        return "embed"
    if name.endswith(("image_newline", "view_seperator")):
        return "vector"
    if name.endswith(("lm_head.weight", "gate.weight")):
        return "head"
    if name.endswith("pos_embed"):
        return "pos"
    return "linear"  # linear / stacked experts [.., out, in] / patch convolution [out, c, kh, kw]


@torch.no_grad()
def draw_parameter(name: str, shape: tuple[int, ...], hidden: int, is_norm: bool, device: torch.device,
                   dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    """One parameter drawn on ``device`` in float32 chunks and cast (bfloat16 randn is coarse)."""
    out = torch.empty(shape, device=device, dtype=dtype)
    scale, offset = init_scale(init_kind(name, is_norm), shape, hidden)
    flat = out.view(-1)
    step = 1 << 26  # 64 M values at a time: bounded float32 scratch
    for start in range(0, flat.numel(), step):
        chunk = torch.randn(min(step, flat.numel() - start), device=device, generator=generator)
        flat[start : start + chunk.numel()] = chunk.mul_(scale).add_(offset)
    return out


def build_random_model(variant: str, device: torch.device, dtype: torch.dtype, *, size: str = "real",
                       layers: Optional[int] = None, vision_layers: Optional[int] = None, seed: int = 0,
                       processor_dir: Optional[Path] = None) -> tuple[DeepseekVL2, DeepseekVL2Processor]:
    """The model (eval mode, on ``device``) and a processor for it; ``processor_dir`` keeps the small files."""
    import tempfile

    config_json = random_config_json(variant, size, layers, vision_layers, dtype)
    config = config_from_dict(config_json)
    model = build_on_meta(config)
    norms = _norm_parameter_names(model)
    generator = torch.Generator(device=device).manual_seed(seed)
    hidden = config.language.hidden_size
    for name, param in list(model.named_parameters()):
        value = draw_parameter(name, tuple(param.shape), hidden, name in norms, device, dtype, generator)
        module_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(module_name) if module_name else model, attr,
                nn.Parameter(value, requires_grad=False))
    model = model.to(device).eval()  # buffers
    if processor_dir is None:
        with tempfile.TemporaryDirectory(prefix="dsvl2-random-") as folder:
            processor = DeepseekVL2Processor.from_pretrained(write_processor_files(Path(folder), config_json))
    else:
        processor = DeepseekVL2Processor.from_pretrained(write_processor_files(processor_dir, config_json))
    return model, processor

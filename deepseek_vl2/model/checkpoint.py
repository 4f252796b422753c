"""Load an official DeepSeek-VL2 checkpoint directory into :class:`DeepseekVL2`.

The model is built on the meta device (no random initialisation) and the tensors read are
assigned as its parameters with ``load_state_dict(assign=True)``. Each tensor is read from the
safetensors files (single ``model.safetensors`` or shards listed in
``model.safetensors.index.json``) straight onto the target device and used as the parameter
itself, cast only when the file's dtype differs from the target. Routed-expert weights are
copied into their stacked tensors, allocated once.
The key check is strict: missing and unexpected keys are listed in the error. The vision
attention-pooling head (``vision.attn_pool.*``) is skipped on purpose — DeepSeek-VL2 never uses it.
Every floating tensor is checked for NaN and inf as it is read, before it is cast or quantized
(8-bit quantization would hide a NaN or turn an inf into NaNs): one sum per tensor.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import torch
from safetensors import safe_open

from .config import DeepseekVL2Config, load_config
from .multimodal import DeepseekVL2
from .moe import quantize_experts
from .quantization import SCALE_SUFFIX, quantize_rows
from .vision import build_vision_tower

UNUSED_KEY_PREFIXES = ("vision.attn_pool.",)
_EXPERT_KEY = re.compile(r"^(?P<moe>.+\.mlp)\.experts\.(?P<e>\d+)\.(?P<part>gate|up|down)_proj\.weight$")


class CheckpointError(RuntimeError):
    """The checkpoint files do not match the model the config describes."""


def default_device() -> torch.device:
    """CUDA when available, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 on CUDA, float32 on CPU."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def weight_files(checkpoint_dir: Path) -> list[Path]:
    """The safetensors files of a checkpoint: the shards of the index, or model.safetensors."""
    index = checkpoint_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [checkpoint_dir / name for name in sorted(set(weight_map.values()))]
    single = checkpoint_dir / "model.safetensors"
    if single.is_file():
        return [single]
    raise CheckpointError(f"no model.safetensors or model.safetensors.index.json in {checkpoint_dir}")


def _target(key: str, intermediate: dict[str, int]) -> tuple[str, tuple]:
    """Map an official key to (parameter name, index into that parameter)."""
    match = _EXPERT_KEY.match(key)
    if match is None:
        return key, ()
    prefix, expert, part = match["moe"], int(match["e"]), match["part"]
    if part == "down":
        return f"{prefix}.experts.down", (expert,)
    size = intermediate[prefix]
    rows = slice(0, size) if part == "gate" else slice(size, 2 * size)
    return f"{prefix}.experts.gate_up", (expert, rows)


def _storage_dtype(name: str, meta: torch.Tensor, dtype: torch.dtype) -> torch.dtype:
    """The dtype parameter ``name`` is kept in: 8-bit weights and float32 scales as built, the rest ``dtype``."""
    return meta.dtype if name.endswith(SCALE_SUFFIX) or meta.dtype.itemsize == 1 else dtype


def expected_keys(model: DeepseekVL2) -> set[str]:
    """The official checkpoint keys this model needs (routed experts listed one by one)."""
    keys = set()
    for name, param in model.named_parameters():
        if name.endswith(SCALE_SUFFIX):  # 8-bit scales: computed at load time, not in the files
            continue
        if name.endswith(".experts.gate_up"):
            prefix = name[: -len(".experts.gate_up")]
            for e in range(param.shape[0]):
                keys.update(f"{prefix}.experts.{e}.{p}_proj.weight" for p in ("gate", "up", "down"))
        elif not name.endswith(".experts.down"):
            keys.add(name)
    return keys


def _iter_tensors(files: list[Path], device: torch.device) -> Iterator[tuple[str, Path, torch.Tensor]]:
    load_device = str(device) if device.type in ("cpu", "cuda") else "cpu"
    for path in files:
        with safe_open(str(path), framework="pt", device=load_device) as handle:
            for key in handle.keys():
                if not key.startswith(UNUSED_KEY_PREFIXES):
                    yield key, path, handle.get_tensor(key)


def check_finite(key: str, path: Path, tensor: torch.Tensor) -> None:
    """Raise CheckpointError naming ``key`` and its file when floating ``tensor`` holds NaN or inf.

    One sum on the tensor's device: a NaN or inf makes it NaN or inf (a sum is about 30 times
    faster than isfinite().all() on a CPU); only a non-finite sum, which an overflow could also
    give, is checked element by element, and the counts are computed for the message.
    """
    if not tensor.is_floating_point():
        return
    values = tensor if tensor.dtype.itemsize > 1 else tensor.half()  # no 8-bit kernels
    if bool(torch.isfinite(values.sum())):
        return
    finite = torch.isfinite(values)
    if bool(finite.all()):  # the sum overflowed
        return
    first = tuple(int(i) for i in (~finite).nonzero()[0])
    counts = (f"{int(values.isnan().sum())} NaN, {int(values.isposinf().sum())} +inf, "
              f"{int(values.isneginf().sum())} -inf")
    raise CheckpointError(
        f"checkpoint tensor {key} in {path} holds non-finite values ({counts} of {values.numel()}; "
        f"the first at index {list(first)}): the file is damaged or was saved from a diverged model. "
        "Download the checkpoint again or point COG_WEIGHTS at an intact one"
    )


def build_on_meta(config: DeepseekVL2Config) -> DeepseekVL2:
    """The model with every parameter on the meta device: no memory, no initialisation.

    timm reads values while building its ViT (the drop-path schedule), which a meta context
    forbids, so the vision tower is built on the CPU first (about 2 s and 1.7 GB at the real
    width, freed at once) and handed in as meta tensors.
    """
    vision = build_vision_tower(config.vision).to("meta")
    with torch.device("meta"):
        model = DeepseekVL2(config, vision=vision)
    return model.requires_grad_(False)


def load_model(
    checkpoint_dir: Union[str, Path],
    device: Optional[Union[str, torch.device]] = None,
    dtype: Optional[torch.dtype] = None,
    *,
    config: Optional[DeepseekVL2Config] = None,
    files: Optional[Sequence[Union[str, Path]]] = None,
    quantize: str = "none",
) -> DeepseekVL2:
    """Build DeepSeek-VL2 from an official checkpoint directory; returns the model in eval mode.

    ``config`` (already parsed from its config.json) and ``files`` (its safetensors files) skip
    reading them again when the caller has them. ``quantize`` ("none", "int8" or "fp8") stores
    the routed and shared experts in 8 bits, each tensor quantized as it is read.
    """
    checkpoint_dir = Path(checkpoint_dir)
    config = config if config is not None else load_config(checkpoint_dir)
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or default_dtype(device)
    files = [Path(f) for f in files] if files is not None else weight_files(checkpoint_dir)
    model = build_on_meta(config)
    if quantize != "none":
        quantize_experts(model, quantize)
    meta = dict(model.named_parameters())
    shapes = {name: tuple(p.shape) for name, p in meta.items()}
    # Only the stacked expert tensors (and their scales) are allocated up front: their experts
    # arrive one by one. Every other parameter takes the tensor read from the file, cast only if
    # its dtype differs, or its 8-bit quantization and scales.
    params = {
        name: torch.empty(p.shape, device=device, dtype=_storage_dtype(name, p, dtype))
        for name, p in meta.items()
        if name.endswith((".experts.gate_up", ".experts.down", ".experts.gate_up" + SCALE_SUFFIX,
                          ".experts.down" + SCALE_SUFFIX))
    }
    intermediate = {
        name[: -len(".experts.gate_up")]: p.shape[1] // 2 for name, p in params.items() if name.endswith(".experts.gate_up")
    }
    needed = expected_keys(model)
    seen: set[str] = set()
    unexpected: list[str] = []
    for key, path, tensor in _iter_tensors(files, device):
        if key not in needed:
            unexpected.append(key)
            continue
        check_finite(key, path, tensor)
        name, index = _target(key, intermediate)
        expected = tuple(params[name][index].shape) if index else shapes[name]
        if expected != tuple(tensor.shape):
            raise CheckpointError(
                f"{key}: checkpoint shape {tuple(tensor.shape)} differs from the config's {expected}"
            )
        scale_name = name + SCALE_SUFFIX
        if scale_name in meta:  # an 8-bit weight: quantized now, one tensor at a time
            tensor, scale = quantize_rows(tensor, quantize)
            if index:
                params[scale_name][index].copy_(scale)
            else:
                params[scale_name] = scale
        if index:
            params[name][index].copy_(tensor)
        else:
            params[name] = tensor.to(device=device, dtype=_storage_dtype(name, meta[name], dtype))
        seen.add(key)
    missing = sorted(needed - seen)
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {checkpoint_dir} does not match its config.json: "
            f"{len(missing)} missing key(s) {missing[:20]}, {len(unexpected)} unexpected key(s) {sorted(unexpected)[:20]}"
        )
    model.load_state_dict(params, strict=True, assign=True)
    return model.eval()

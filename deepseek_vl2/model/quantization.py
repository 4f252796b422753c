"""Weight-only 8-bit storage of the routed and shared experts (int8 or fp8 e4m3).

Each output channel (a row of a ``[.., out, in]`` weight) keeps one float32 scale: ``w ≈ q ·
scale[row]`` with ``q`` int8 in [-127, 127] (scale = row max / 127) or float8 e4m3 (scale = row
max / 448, its largest finite value). Activations stay in the model dtype; the 8-bit weights are
widened inside the expert matmuls and the scale multiplies each output channel after the sum.

The official checkpoints are bf16: :func:`quantize_rows` runs at load time on each expert
tensor as it is read (deepseek_vl2/model/checkpoint.py), so no 8-bit file format exists and no
full-precision copy of the experts is ever held. Gate, norms, embeddings, attention, the vision
tower and the projector stay in the model dtype.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .config import LanguageConfig

# Format name → storage dtype and the largest magnitude it holds.
FORMATS: dict[str, tuple[torch.dtype, float]] = {
    "int8": (torch.int8, 127.0),
    "fp8": (torch.float8_e4m3fn, 448.0),
}
QUANTIZE_ENV = "DSVL2_QUANTIZE"  # the setting, read once at setup (engine/config.py)
QUANTIZE_SETTINGS = ("auto", "none", *FORMATS)  # auto: bf16 where it fits, else 8-bit
SCALE_SUFFIX = "_scale"  # parameter names of the scales; no official checkpoint key ends so


def check_format(name: str) -> str:
    """``name`` if it is an 8-bit format; a ValueError listing the formats otherwise."""
    if name not in FORMATS:
        raise ValueError(f"unknown 8-bit weight format {name!r}; use one of: {', '.join(FORMATS)}")
    return name


def quantize_rows(weight: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [..., out, in] → (8-bit values of the same shape, float32 scales [..., out])."""
    dtype, largest = FORMATS[fmt]
    w = weight.float()
    scale = w.abs().amax(dim=-1) / largest  # [..., out]
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row stays zero
    scaled = w / scale.unsqueeze(-1)
    if dtype == torch.int8:
        scaled = scaled.round().clamp_(-largest, largest)
    return scaled.to(dtype), scale


def project(x: torch.Tensor, weight: torch.Tensor, scale: Optional[torch.Tensor]) -> torch.Tensor:
    """x [n, in] @ weight [out, in]ᵀ → [n, out]; an 8-bit weight is widened to x's dtype and its
    per-row ``scale`` [out] applied to the outputs (float32 product, cast back)."""
    if scale is None:
        return F.linear(x, weight)
    return (F.linear(x, weight.to(x.dtype)).float() * scale).to(x.dtype)


class QuantizedLinear(nn.Module):
    """A bias-free linear layer holding 8-bit weights [out, in] and float32 scales [out]."""

    def __init__(self, in_features: int, out_features: int, fmt: str) -> None:
        super().__init__()
        dtype = FORMATS[check_format(fmt)][0]
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype), requires_grad=False)
        self.weight_scale = nn.Parameter(torch.empty(out_features), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] → [..., out]."""
        return project(x.reshape(-1, x.shape[-1]), self.weight, self.weight_scale).view(*x.shape[:-1], -1)


@torch.no_grad()
def quantize_experts(model: nn.Module, fmt: str) -> nn.Module:
    """Store every MoE layer's routed and shared experts in 8 bits, in place; returns ``model``.

    Routed experts get 8-bit ``gate_up``/``down`` plus ``gate_up_scale`` [E, 2I] and
    ``down_scale`` [E, D]; the shared experts' three linears become :class:`QuantizedLinear`.
    On a model built on the meta device this only sets the shapes and dtypes (the loader then
    fills them with :func:`quantize_rows` as it reads the bf16 checkpoint); on a loaded model it
    quantizes one expert at a time, so the extra memory is one expert's float32 copy.
    """
    from .moe import MoE  # moe imports project() from here

    dtype = FORMATS[check_format(fmt)][0]
    for module in model.modules():
        if not isinstance(module, MoE):
            continue
        experts = module.experts
        for name in ("gate_up", "down"):
            weight = getattr(experts, name)  # [E, out, in]
            values = torch.empty(weight.shape, dtype=dtype, device=weight.device)
            scales = torch.empty(weight.shape[:2], device=weight.device)
            if weight.device.type != "meta":
                for e in range(weight.shape[0]):
                    values[e], scales[e] = quantize_rows(weight[e], fmt)
            setattr(experts, name, nn.Parameter(values, requires_grad=False))
            setattr(experts, name + SCALE_SUFFIX, nn.Parameter(scales, requires_grad=False))
        if module.shared_experts is not None:
            for name in ("gate_proj", "up_proj", "down_proj"):
                linear = getattr(module.shared_experts, name)
                with torch.device(linear.weight.device):
                    quantized = QuantizedLinear(linear.in_features, linear.out_features, fmt)
                if linear.weight.device.type != "meta":
                    quantized.weight.data, quantized.weight_scale.data = quantize_rows(linear.weight, fmt)
                setattr(module.shared_experts, name, quantized)
    return model


def expert_parameters(config: LanguageConfig) -> tuple[int, int]:
    """(parameters, output channels) of all routed and shared experts a language config holds."""
    layers = sum(config.is_moe_layer(i) for i in range(config.num_hidden_layers))
    d, i = config.hidden_size, config.moe_intermediate_size
    shared = i * (config.n_shared_experts or 0)
    per_layer_params = (config.n_routed_experts or 0) * 3 * d * i + 3 * d * shared
    per_layer_channels = (config.n_routed_experts or 0) * (2 * i + d) + (2 * shared + d if shared else 0)
    return layers * per_layer_params, layers * per_layer_channels


def weight_bytes(n_params: int, experts: int, channels: int, fmt: str, bytes_per_param: int = 2) -> int:
    """Bytes of weights of ``n_params`` parameters, ``experts`` of them expert parameters with
    ``channels`` output channels (:func:`expert_parameters`), stored in ``fmt``: "none", every
    parameter at ``bytes_per_param``; "int8"/"fp8", experts one byte each plus a float32 scale
    per channel."""
    if fmt == "none":
        return n_params * bytes_per_param
    return (n_params - experts) * bytes_per_param + experts + channels * 4

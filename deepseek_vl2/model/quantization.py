"""Weight-only 8-bit storage of the routed and shared experts (int8 or fp8 e4m3).

Each output channel (a row of a ``[.., out, in]`` weight) keeps one float32 scale: ``w ≈ q ·
scale[row]`` with ``q`` int8 in [-127, 127] (scale = row max / 127) or float8 e4m3 (scale = row
max / 448, its largest finite value). Activations stay in the model dtype; the 8-bit weights are
widened inside the expert matmuls and the scale multiplies each output channel after the sum.

The official checkpoints are bf16: :func:`quantize_rows` runs at load time on each expert
tensor as it is read (deepseek_vl2/model/checkpoint.py; the MoE layers' experts are swapped for
8-bit ones by :func:`~.moe.quantize_experts`), so no 8-bit file format exists and no
full-precision copy of the experts is ever held. Gate, norms, embeddings, attention, the vision
tower and the projector stay in the model dtype.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

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

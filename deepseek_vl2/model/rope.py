"""Rotary position embeddings: plain (rope_theta) and DeepSeek-V2's yarn scaling.

cos/sin are computed on the fly from absolute positions ([B, T] int64) in float32, which is
what the reference's cached tables hold too (outer product of positions and inverse frequencies).
"""
from __future__ import annotations

import math
from typing import Optional

import torch


def _yarn_correction_dim(rotations: float, dim: int, base: float, max_positions: int) -> float:
    return (dim * math.log(max_positions / (rotations * 2 * math.pi))) / (2 * math.log(base))


def yarn_mscale(scale: float, mscale: float) -> float:
    """Attention / embedding magnitude correction of yarn (1.0 when not scaling)."""
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


class RotaryEmbedding:
    """Produces cos/sin [B, T, dim] for given positions, with optional yarn scaling."""

    def __init__(self, dim: int, base: float, scaling: Optional[dict] = None) -> None:
        self.dim = dim
        exponents = torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim
        inv_freq = 1.0 / (base**exponents)
        self.magnitude = 1.0
        if scaling is not None:
            factor = float(scaling["factor"])
            original = int(scaling.get("original_max_position_embeddings", 4096))
            beta_fast = float(scaling.get("beta_fast", 32))
            beta_slow = float(scaling.get("beta_slow", 1))
            low = max(math.floor(_yarn_correction_dim(beta_fast, dim, base, original)), 0)
            high = min(math.ceil(_yarn_correction_dim(beta_slow, dim, base, original)), dim - 1)
            if low == high:
                high += 0.001
            ramp = ((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
            keep_original = 1.0 - ramp  # 1 for high-frequency dims, which yarn leaves unscaled
            inv_freq = (inv_freq / factor) * (1 - keep_original) + inv_freq * keep_original
            self.magnitude = yarn_mscale(factor, float(scaling.get("mscale", 1))) / yarn_mscale(
                factor, float(scaling.get("mscale_all_dim", 0))
            )
        self.inv_freq = inv_freq

    def to(self, device: torch.device) -> "RotaryEmbedding":
        """Keep the inverse frequencies on ``device`` (the model's), so that no step copies them.

        Called once the model is on its device (:func:`place_rotary_tables`), before any step is
        compiled: nothing in :meth:`cos_sin` writes state, so a compiled trace adds no guard that
        a later call breaks (a cache filled during the first trace made it compile twice).
        """
        self.inv_freq = self.inv_freq.to(device)
        return self

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape [B, T, dim] in ``dtype`` for int positions [B, T]."""
        inv_freq = self.inv_freq
        if inv_freq.device != positions.device:  # not placed yet (eager only: compiled steps are placed first)
            inv_freq = inv_freq.to(positions.device)
        freqs = positions.to(torch.float32).unsqueeze(-1) * inv_freq
        angles = torch.cat((freqs, freqs), dim=-1)
        return (angles.cos() * self.magnitude).to(dtype), (angles.sin() * self.magnitude).to(dtype)


def place_rotary_tables(model: torch.nn.Module, device: torch.device) -> int:
    """Move every :class:`RotaryEmbedding` held by a module of ``model`` to ``device``; returns how many."""
    tables = {id(v): v for m in model.modules() for v in vars(m).values() if isinstance(v, RotaryEmbedding)}
    for table in tables.values():
        table.to(device)
    return len(tables)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on x [B, T, H, dim] with cos/sin [B, T, dim]."""
    return x * cos.unsqueeze(2) + rotate_half(x) * sin.unsqueeze(2)


def deinterleave(x: torch.Tensor) -> torch.Tensor:
    """(x0, x1), (x2, x3), … → x0, x2, …, x1, x3, … along the last dim (MLA's rope layout)."""
    return torch.cat((x[..., 0::2], x[..., 1::2]), dim=-1)

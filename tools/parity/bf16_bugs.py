"""Three bf16-only bugs the bf16 parity check must report, as context managers that inject them.

Each changes the bfloat16 model only: the float32-storage and float64 runs the check compares
with are unaffected (exact in float32 and float64, or applied to the bf16 copy alone).
tests/parity/test_bf16_check.py asserts the check fails each; tools/parity/bf16_margin_sweep.py measures by
how much.
"""
from __future__ import annotations

import contextlib
from typing import Callable, ContextManager, Iterator

import torch

from deepseek_vl2.model import rope
from deepseek_vl2.model.multimodal import DeepseekVL2


@contextlib.contextmanager
def rope_angles_in_bf16(model: DeepseekVL2) -> Iterator[None]:
    """The rotary angles (position × inverse frequency) computed in the model's dtype instead of
    float32: exact in float32 and float64, off by up to a few radians in bf16 past position 256."""
    original = rope.RotaryEmbedding.cos_sin

    def angles_in_model_dtype(self: rope.RotaryEmbedding, positions: torch.Tensor, dtype: torch.dtype):
        freqs = positions.to(dtype).unsqueeze(-1) * self.inv_freq.to(positions.device, dtype)
        angles = torch.cat((freqs, freqs), dim=-1)
        return (angles.cos() * self.magnitude).to(dtype), (angles.sin() * self.magnitude).to(dtype)

    rope.RotaryEmbedding.cos_sin = angles_in_model_dtype
    try:
        yield
    finally:
        rope.RotaryEmbedding.cos_sin = original


@contextlib.contextmanager
def positions_cast_to_bf16(model: DeepseekVL2) -> Iterator[None]:
    """A bad cast: the position ids pass through the model's dtype (rounded to even numbers past
    256), which moves both the rotary angles and the causal mask."""
    original = DeepseekVL2.forward_embeds

    def positions_through_model_dtype(self: DeepseekVL2, embeds, positions, *args, **kwargs):
        return original(self, embeds, positions.to(self.dtype).to(positions.dtype), *args, **kwargs)

    DeepseekVL2.forward_embeds = positions_through_model_dtype
    try:
        yield
    finally:
        DeepseekVL2.forward_embeds = original


@contextlib.contextmanager
def wrong_lm_head_weight(model: DeepseekVL2) -> Iterator[None]:
    """A wrong weight: the bf16 LM head scaled by 1 + 2^-6 (a conversion that got one tensor's
    scale wrong by 1.6 %, about two bf16 steps); restored on exit."""
    weight = model.language.lm_head.weight
    saved = weight.detach().clone()
    with torch.no_grad():
        weight.mul_(1 + 2.0**-6)
    try:
        yield
    finally:
        with torch.no_grad():
            weight.copy_(saved)


BF16_BUGS: dict[str, Callable[[DeepseekVL2], ContextManager[None]]] = {
    "rope angles in bf16": rope_angles_in_bf16,
    "position ids cast to bf16": positions_cast_to_bf16,
    "LM-head weight x (1 + 2^-6)": wrong_lm_head_weight,
}

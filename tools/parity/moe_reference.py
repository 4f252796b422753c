"""Reference implementations of the routed experts, for tests to compare the model's paths against.

The model keeps one path per job (deepseek_vl2/model/moe.py: grouped prefill, fused or looped
decode). These are the other ways to compute the same thing, kept here because they are easy to
read and check: gather the chosen weights and batch the matmuls, or run every expert on every
token and pick.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from deepseek_vl2.model.moe import StackedExperts


def gathered(stack: StackedExperts, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """x [N, D], ids [N, k] → [N, k, D], copying the chosen experts' weights then batched matmuls."""
    n, k = ids.shape
    flat_ids = ids.reshape(-1)
    inputs = x.repeat_interleave(k, dim=0).unsqueeze(-1)  # [N·k, D, 1]
    gate, up = torch.bmm(stack.gate_up[flat_ids], inputs).squeeze(-1).split(stack.intermediate, dim=-1)
    hidden = (F.silu(gate) * up).unsqueeze(-1)  # [N·k, I, 1]
    return torch.bmm(stack.down[flat_ids], hidden).view(n, k, -1)


def dense(stack: StackedExperts, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """x [N, D], ids [N, k] → [N, k, D], every expert run on every token, then the chosen picked."""
    gate, up = torch.einsum("nd,eid->nei", x, stack.gate_up).split(stack.intermediate, dim=-1)
    out = torch.einsum("nei,edi->ned", F.silu(gate) * up, stack.down)  # [N, E, D]
    return out.gather(1, ids.unsqueeze(-1).expand(-1, -1, out.shape[-1]))

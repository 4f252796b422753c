"""Self-attention of the DeepSeek-V2 decoder: plain multi-head (Tiny) and multi-head latent (MLA).

Both take hidden states x [B, T, D], rotary cos/sin, absolute positions [B, T] and optionally a
layer cache with the request slots [B] and the number of cached positions to read (kv_len, a
host int). A query at position p attends to keys at positions <= p of its own sequence.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .config import LanguageConfig
from .kv_cache import LayerCache, Slots
from .norm import RMSNorm
from .rope import RotaryEmbedding, apply_rotary, deinterleave, yarn_mscale


def causal_mask(positions: torch.Tensor, key_positions: torch.Tensor) -> torch.Tensor:
    """Boolean mask [B, 1, T, S]: query at positions[b, t] may see keys at key_positions[b|0, s] <= it."""
    return key_positions.unsqueeze(1).unsqueeze(1) <= positions.unsqueeze(1).unsqueeze(-1)


def _key_positions(positions: torch.Tensor, cache: Optional[LayerCache], kv_len: int) -> torch.Tensor:
    if cache is None:
        return positions
    return torch.arange(kv_len, device=positions.device).unsqueeze(0)


class MultiHeadAttention(nn.Module):
    """Llama-style attention with rotary embedding over the full head dimension (use_mla false)."""

    def __init__(self, config: LanguageConfig) -> None:
        super().__init__()
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_kv_heads
        self.head_dim = config.hidden_size // self.heads
        self.q_proj = nn.Linear(config.hidden_size, self.heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, self.kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.heads * self.head_dim, config.hidden_size, bias=False)
        self.rotary = RotaryEmbedding(self.head_dim, config.rope_theta)

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        cache: Optional[LayerCache] = None,
        slots: Optional[Slots] = None,
        kv_len: int = 0,
    ) -> torch.Tensor:
        b, t, _ = x.shape
        cos, sin = self.rotary.cos_sin(positions, x.dtype)
        q = apply_rotary(self.q_proj(x).view(b, t, self.heads, self.head_dim), cos, sin)
        k = apply_rotary(self.k_proj(x).view(b, t, self.kv_heads, self.head_dim), cos, sin)
        v = self.v_proj(x).view(b, t, self.kv_heads, self.head_dim)
        if cache is not None:
            cache.write(slots, positions, k, v)
            k, v = cache.read(slots, kv_len)  # [B, S, kv_heads, head_dim]
        if self.kv_heads != self.heads:
            k = k.repeat_interleave(self.heads // self.kv_heads, dim=2)
            v = v.repeat_interleave(self.heads // self.kv_heads, dim=2)
        mask = causal_mask(positions, _key_positions(positions, cache, kv_len))
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2).to(q.dtype), v.transpose(1, 2).to(q.dtype), attn_mask=mask
        )
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.heads * self.head_dim))


class MultiHeadLatentAttention(nn.Module):
    """DeepSeek-V2 MLA: keys/values are expanded from a cached low-rank latent plus a shared rope key.

    Two equivalent ways to attend: "expand" (materialise per-head K/V from the latent — cheap for
    long query chunks) and "absorb" (fold kv_b_proj into the query and the output and attend over
    the latent directly — cheap for decode, where the query is one token).
    """

    absorb_max_query_len = 8

    def __init__(self, config: LanguageConfig) -> None:
        super().__init__()
        self.heads = config.num_attention_heads
        self.nope_dim = config.qk_nope_head_dim
        self.rope_dim = config.qk_rope_head_dim
        self.v_dim = config.v_head_dim
        self.kv_rank = config.kv_lora_rank
        q_dim = self.heads * (self.nope_dim + self.rope_dim)
        if config.q_lora_rank is None:
            self.q_proj = nn.Linear(config.hidden_size, q_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(config.hidden_size, config.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(config.q_lora_rank, config.rms_norm_eps)
            self.q_b_proj = nn.Linear(config.q_lora_rank, q_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(config.hidden_size, self.kv_rank + self.rope_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(self.kv_rank, config.rms_norm_eps)
        self.kv_b_proj = nn.Linear(self.kv_rank, self.heads * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = nn.Linear(self.heads * self.v_dim, config.hidden_size, bias=False)
        self.rotary = RotaryEmbedding(self.rope_dim, config.rope_theta, config.rope_scaling)
        self.scale = (self.nope_dim + self.rope_dim) ** -0.5
        if config.rope_scaling is not None and config.rope_scaling.get("mscale_all_dim"):
            m = yarn_mscale(float(config.rope_scaling["factor"]), float(config.rope_scaling["mscale_all_dim"]))
            self.scale *= m * m

    def _query(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "q_proj"):
            return self.q_proj(x)
        return self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        cache: Optional[LayerCache] = None,
        slots: Optional[Slots] = None,
        kv_len: int = 0,
    ) -> torch.Tensor:
        b, t, _ = x.shape
        cos, sin = self.rotary.cos_sin(positions, x.dtype)
        q = self._query(x).view(b, t, self.heads, self.nope_dim + self.rope_dim)
        q_nope, q_rope = q.split([self.nope_dim, self.rope_dim], dim=-1)
        q_rope = apply_rotary(deinterleave(q_rope), cos, sin)
        latent, k_rope = self.kv_a_proj_with_mqa(x).split([self.kv_rank, self.rope_dim], dim=-1)
        latent = self.kv_a_layernorm(latent)  # [B, T, r]
        k_rope = apply_rotary(deinterleave(k_rope).unsqueeze(2), cos, sin).squeeze(2)  # [B, T, rope]
        if cache is not None:
            cache.write(slots, positions, latent, k_rope)
            latent, k_rope = cache.read(slots, kv_len)
            latent, k_rope = latent.to(x.dtype), k_rope.to(x.dtype)
        mask = causal_mask(positions, _key_positions(positions, cache, kv_len))
        if t <= self.absorb_max_query_len:
            out = self._attend_absorbed(q_nope, q_rope, latent, k_rope, mask)
        else:
            out = self._attend_expanded(q_nope, q_rope, latent, k_rope, mask)
        return self.o_proj(out.reshape(b, t, self.heads * self.v_dim))

    def _attend_expanded(self, q_nope, q_rope, latent, k_rope, mask) -> torch.Tensor:
        """Per-head K/V from the latent, then SDPA. Returns [B, T, H, v_dim]."""
        b, s, _ = latent.shape
        kv = self.kv_b_proj(latent).view(b, s, self.heads, self.nope_dim + self.v_dim)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        k = torch.cat((k_nope, k_rope.unsqueeze(2).expand(b, s, self.heads, self.rope_dim)), dim=-1)
        q = torch.cat((q_nope, q_rope), dim=-1)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, scale=self.scale
        )
        return out.transpose(1, 2)

    def _attend_absorbed(self, q_nope, q_rope, latent, k_rope, mask) -> torch.Tensor:
        """Attention over the latent with kv_b_proj folded into q and the output. Returns [B, T, H, v_dim]."""
        w = self.kv_b_proj.weight.view(self.heads, self.nope_dim + self.v_dim, self.kv_rank)
        w_key, w_value = w[:, : self.nope_dim], w[:, self.nope_dim :]
        q_latent = torch.einsum("bthn,hnr->bhtr", q_nope, w_key)
        scores = torch.einsum("bhtr,bsr->bhts", q_latent, latent)
        scores = scores + torch.einsum("bthe,bse->bhts", q_rope, k_rope)
        scores = (scores * self.scale).masked_fill(~mask, float("-inf"))
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(latent.dtype)
        out_latent = torch.einsum("bhts,bsr->bhtr", probs, latent)
        return torch.einsum("bhtr,hvr->bthv", out_latent, w_value)


def build_attention(config: LanguageConfig) -> nn.Module:
    """MLA when ``use_mla`` (Small, base), else plain multi-head attention (Tiny)."""
    return MultiHeadLatentAttention(config) if config.use_mla else MultiHeadAttention(config)

"""The DeepSeek-V2 decoder-only language model (pre-norm, MHA or MLA, dense or MoE blocks)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .attention import build_attention
from .config import LanguageConfig
from .kv_cache import KVCache, LayerCache, Slots
from .moe import MLP, MoE, Routing
from .norm import RMSNorm


class DecoderLayer(nn.Module):
    """x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: LanguageConfig, index: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = build_attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        if config.is_moe_layer(index):
            self.mlp: nn.Module = MoE(config)
        else:
            self.mlp = MLP(config.hidden_size, config.intermediate_size)

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        cache: Optional[LayerCache] = None,
        slots: Optional[Slots] = None,
        kv_len: int = 0,
        routing: Optional[Routing] = None,
    ) -> torch.Tensor:
        """One block on x [B, T, D]; ``routing`` records or replays the MoE choice (MoE layers only)."""
        x = x + self.self_attn(self.input_layernorm(x), positions, cache, slots, kv_len)
        normed = self.post_attention_layernorm(x)
        return x + (self.mlp(normed, routing) if isinstance(self.mlp, MoE) else self.mlp(normed))


class DecoderStack(nn.Module):
    """Token embedding, decoder layers and final norm (checkpoint prefix ``language.model.``)."""

    def __init__(self, config: LanguageConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class LanguageModel(nn.Module):
    """Decoder plus LM head (checkpoint prefix ``language.``)."""

    def __init__(self, config: LanguageConfig) -> None:
        super().__init__()
        self.config = config
        self.model = DecoderStack(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def hidden_states(
        self,
        embeds: torch.Tensor,
        positions: torch.Tensor,
        cache: Optional[KVCache] = None,
        slots: Optional[Slots] = None,
        kv_len: Optional[int] = None,
        routing: Optional[Routing] = None,
    ) -> torch.Tensor:
        """Run the decoder on embeds [B, T, D] at positions [B, T]; returns the final-normed states.

        With a cache, ``kv_len`` is the number of cached positions to attend over (at least
        max(positions) + 1); when omitted it is read from ``positions`` (one host sync).
        ``routing`` records (or replays) every MoE layer's expert choice, in layer order.
        """
        if cache is not None:
            if slots is None:
                slots = torch.arange(embeds.shape[0], device=embeds.device)
            if kv_len is None:
                kv_len = int(positions.max()) + 1
        x = embeds
        for i, layer in enumerate(self.model.layers):
            x = layer(x, positions, cache.layers[i] if cache is not None else None, slots, kv_len or 0, routing)
        return self.model.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """LM head, returned in float32 as the reference does."""
        return self.lm_head(hidden).float()

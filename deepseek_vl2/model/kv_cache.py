"""Key/value cache with a slot (request) dimension, allocated once.

* Plain attention layers keep keys and values: [slots, max_len, kv_heads, head_dim] each.
* MLA layers keep what the reference keeps — the normalised latent [slots, max_len, kv_lora_rank]
  and the rotated shared rope key [slots, max_len, qk_rope_head_dim] — never per-head K/V.

A request owns one slot; token t of a request lives at index t of its slot. Writing is an
index_put at (slot, position); reading takes slots [0:kv_len] (kv_len a host-side int that the
caller tracks, so no device→host synchronisation is needed). ``slots`` is a LongTensor [B] (read
by gathering: a copy) or, when the caller knows the slots are consecutive, a Python ``slice``
(read as a view: no copy — the single-request path).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import torch

Slots = Union[torch.Tensor, slice]


def slot_rows(slots: Slots, device) -> torch.Tensor:
    """Slot indices [B] as a tensor, from a tensor or a slice."""
    if isinstance(slots, slice):
        return torch.arange(slots.start, slots.stop, device=device)
    return slots

from .config import LanguageConfig


@dataclass
class LayerCache:
    """Two tensors of one layer: (keys, values) for MHA or (latent, rope_key) for MLA."""

    first: torch.Tensor
    second: torch.Tensor

    def write(self, slots: Slots, positions: torch.Tensor, first: torch.Tensor, second: torch.Tensor) -> None:
        """Store [B, T, ...] entries at (slots[b], positions[b, t])."""
        rows = slot_rows(slots, positions.device).unsqueeze(1).expand_as(positions)
        self.first.index_put_((rows, positions), first.to(self.first.dtype))
        self.second.index_put_((rows, positions), second.to(self.second.dtype))

    def read(self, slots: Slots, kv_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Entries [B, kv_len, ...] of the given slots (a view when ``slots`` is a slice)."""
        return self.first[slots, :kv_len], self.second[slots, :kv_len]


class KVCache:
    """Per-layer caches for ``max_slots`` concurrent sequences of up to ``max_len`` tokens."""

    def __init__(self, config: LanguageConfig, max_slots: int, max_len: int, device, dtype: torch.dtype) -> None:
        self.max_slots = max_slots
        self.max_len = max_len
        if config.use_mla:
            shapes = ((config.kv_lora_rank,), (config.qk_rope_head_dim,))
        else:
            head_dim = config.hidden_size // config.num_attention_heads
            shapes = ((config.num_kv_heads, head_dim), (config.num_kv_heads, head_dim))
        self.layers = [
            LayerCache(
                torch.zeros((max_slots, max_len, *shapes[0]), device=device, dtype=dtype),
                torch.zeros((max_slots, max_len, *shapes[1]), device=device, dtype=dtype),
            )
            for _ in range(config.num_hidden_layers)
        ]

    def clear(self, slot: int) -> None:
        """Zero one slot's entries in every layer.

        Attention masks positions past a request's length with probability 0, and 0 x NaN is NaN:
        a slot that may hold non-finite entries (its request failed) must be cleared before reuse."""
        for layer in self.layers:
            layer.first[slot].zero_()
            layer.second[slot].zero_()

    def nbytes(self) -> int:
        """Memory held by the cache."""
        return sum(t.numel() * t.element_size() for layer in self.layers for t in (layer.first, layer.second))

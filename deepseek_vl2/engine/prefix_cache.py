"""The prefix cache: a finished request's slot stays parked with its tokens, and a later request
whose tokens begin with them reuses that KV.

No memory beyond the decode state: a parked slot is a free slot of the
:class:`~.decode.DecodeState` whose KV rows still hold what its last request wrote. Each parked
slot is remembered by its *keys*, one int64 per cache position:

* a text position's key is its token id (>= 0);
* an image position's key is negative, derived from a hash of that image's pixels as processed
  (its tile tensors and tiling), never from its placeholder id (every image has the same one).

KV at position ``i`` depends only on the inputs at positions ``<= i`` (causal attention), so
the longest common prefix of two key sequences is KV the new request may reuse. An image that
changed (other pixels, or a tiling that changed because a third image arrived) has another
hash, so the match stops at its first position. Two images with the same pixels and tiling
have the same tokens, so a run of one image's key is unambiguous.

Choosing a slot (:meth:`PrefixCache.choose`): a request overwrites a parked slot after the
part it reuses, so it takes a parked slot only when the match is worth it — at least as long as
what it would overwrite there (a conversation going on overwrites nothing) — and then the one
with the longest match; else the lowest free slot nothing is parked in (low slots keep the
stepped rows few); else the least recently parked slot, reusing whatever prefix it shares. A match
stops one short of the prompt: the last prompt token is always prefilled (it gives the first
token's logits). The chosen slot's parked tokens are forgotten before it is handed out. Two requests matching the
same parked slot: the first admitted takes it, the second prefills in full (a copy of the rows
would save the prefill but needs the first request not to have overwritten them yet).
"""
from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from deepseek_vl2.inputs.processor import ProcessedInputs

IMAGE_KEY_BITS = 62  # image keys are -1 .. -2**62: never a token id


@dataclass(frozen=True)
class Match:
    """Where a request goes: its ``slot`` and the leading positions of that slot's KV it reuses."""

    slot: int
    reused: int


def image_keys(inputs: ProcessedInputs) -> list[int]:
    """One negative key per image of ``inputs``: a hash of its tiles (global view and local tiles)
    as processed, and of its tiling."""
    keys, start = [], 0
    for across, down in inputs.images_spatial_crop.tolist():
        if across <= 0 or down <= 0:  # the text-only placeholder
            continue
        count = 1 + across * down
        tiles = inputs.images[start : start + count].detach().to("cpu").contiguous()
        start += count
        digest = hashlib.blake2b(f"{across}x{down}:{tiles.dtype}".encode(), digest_size=8)
        digest.update(tiles.numpy().tobytes())
        keys.append(-1 - (int.from_bytes(digest.digest(), "little") & ((1 << IMAGE_KEY_BITS) - 1)))
    return keys


def sequence_keys(inputs: ProcessedInputs) -> torch.Tensor:
    """The keys [T] int64 (CPU) of a prompt: token ids, and each image's hash at its positions."""
    keys = inputs.input_ids.reshape(-1).to("cpu", torch.long).clone()
    mask = inputs.images_seq_mask.reshape(-1).to("cpu", torch.bool)
    per_image = image_keys(inputs)
    if mask.any():
        counts = list(inputs.num_image_tokens)
        if len(counts) != len(per_image) or sum(counts) != int(mask.sum()):
            raise ValueError(f"the prompt has {int(mask.sum())} image positions but its {len(per_image)} image(s) "
                             f"give {sum(counts)} tokens")
        keys[mask] = torch.repeat_interleave(torch.tensor(per_image, dtype=torch.long), torch.tensor(counts))
    return keys


def common_prefix(a: torch.Tensor, b: torch.Tensor) -> int:
    """Length of the longest common prefix of two 1-D key tensors."""
    n = min(a.numel(), b.numel())
    if n == 0:
        return 0
    differs = torch.nonzero(a[:n] != b[:n])
    return int(differs[0, 0]) if differs.numel() else n


class PrefixCache:
    """The parked slots and their keys (used by the one thread that hands out slots)."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._parked: dict[int, tuple[torch.Tensor, int]] = {}  # slot -> (keys, park order)
        self._clock = itertools.count()

    @property
    def parked(self) -> dict[int, int]:
        """Tokens parked per slot (a copy)."""
        return {slot: keys.numel() for slot, (keys, _) in self._parked.items()}

    def choose(self, keys: Optional[torch.Tensor], free: Sequence[int]) -> Match:
        """The free slot a request with prompt ``keys`` takes, and the KV it reuses there (see the
        module docstring); that slot's parked tokens are forgotten. Raises ValueError with no free slot."""
        if not free:
            raise ValueError("no free slot to choose from")
        matches = {slot: self._reusable(slot, keys) for slot in free if slot in self._parked}
        worth = [slot for slot, reused in matches.items() if 2 * reused >= self._parked[slot][0].numel()]
        unparked = [slot for slot in free if slot not in self._parked]
        if worth:
            slot = max(worth, key=lambda s: (matches[s], -s))
        elif unparked:
            slot = min(unparked)
        else:
            slot = min(matches, key=lambda s: self._parked[s][1])
        match = Match(slot, matches.get(slot, 0))
        self.forget(match.slot)
        return match

    def _reusable(self, slot: int, keys: Optional[torch.Tensor]) -> int:
        """Leading positions of parked ``slot`` a prompt with ``keys`` may reuse (all but its last)."""
        if not self.enabled or keys is None:
            return 0
        return max(0, min(common_prefix(self._parked[slot][0], keys), keys.numel() - 1))

    def park(self, slot: int, keys: torch.Tensor) -> None:
        """Remember that ``slot``'s KV holds ``keys`` (positions [0, len(keys))) while it is free."""
        if self.enabled and keys.numel() > 0:
            self._parked[slot] = (keys, next(self._clock))
        else:
            self.forget(slot)

    def forget(self, slot: int) -> None:
        """``slot``'s KV no longer holds what was parked there (it is reused, or its rows are gone)."""
        self._parked.pop(slot, None)

    def clear(self) -> None:
        """Forget every parked slot (the decode state was allocated anew)."""
        self._parked.clear()

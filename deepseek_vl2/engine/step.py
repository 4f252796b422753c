"""The one static-shape decode step, eager or compiled region by region.

A step over rows ``[0, rows)`` of the decode state (:class:`~.decode.DecodeState`) is three parts:

* :func:`step_inputs` — each row's last token embedded, and the position it goes to (idle rows:
  the scratch column);
* :func:`layer_step`, once per decoder layer — attention over the KV cache, then the dense MLP or
  the MoE;
* :func:`step_outputs` — final norm, LM head, the sampler, and the new tokens, positions and seen
  marks written back into the state.

:func:`decode_step` runs them eagerly. :class:`CompiledStep` runs the same three parts as
``torch.compile(fullgraph=True)`` regions ("regional compilation"): one region per (part, rows
bucket) — and per mode for the outputs — where the layer part is compiled once for each *kind* of
layer (dense, MoE) and reused by every layer of that kind, its parameters and cache tensors being
graph inputs. Compile cost is therefore independent of depth. The KV length is the dynamic length
of ``key_positions`` (``mark_dynamic`` without bounds), so KV buckets never recompile.
"""
from __future__ import annotations

import types
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

from deepseek_vl2.model.kv_cache import LayerCache
from deepseek_vl2.model.moe import MoE
from deepseek_vl2.model.multimodal import DeepseekVL2
from .sampling import choose_tokens

if TYPE_CHECKING:
    from .decode import DecodeState

Step = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def step_inputs(model: DeepseekVL2, state: "DecodeState", rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(embeds [rows, 1, D], positions [rows, 1]): each row's last token and where it goes."""
    positions = torch.where(state.active[:rows], state.positions[:rows], state.max_len)  # idle rows: scratch
    return model.language.model.embed_tokens(state.tokens[:rows].unsqueeze(1)), positions.unsqueeze(1)


def layer_step(layer: nn.Module, x: torch.Tensor, positions: torch.Tensor, cache: LayerCache,
               key_positions: torch.Tensor, rows: int) -> torch.Tensor:
    """One decoder layer over rows [0, rows), attending over cache positions [0, len(key_positions))."""
    return layer(x, positions, cache, slice(0, rows), key_positions.shape[0])


def step_outputs(model: DeepseekVL2, state: "DecodeState", x: torch.Tensor, positions: torch.Tensor, rows: int,
                 full: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Final norm, logits, sampling; writes the new tokens back. Returns (new tokens [rows], logits [rows, V]).

    ``full`` False: every active row is plain greedy (argmax of the raw logits)."""
    logits = model.language.logits(model.language.model.norm(x))[:, -1]
    active, last, stored = state.active[:rows], state.tokens[:rows], state.positions[:rows]
    seen = state.seen[:rows]
    columns = state.columns.head(rows) if full else None
    new = torch.where(active, choose_tokens(logits, seen, columns, state.uniforms[:rows]), last)
    last.copy_(new)
    stored.copy_(torch.where(active, positions[:, 0] + 1, stored))
    index = new.unsqueeze(1)
    seen.scatter_(1, index, seen.gather(1, index) | active.unsqueeze(1))
    return new, logits


def decode_step(model: DeepseekVL2, state: "DecodeState", key_positions: torch.Tensor, *, rows: int,
                full: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """One eager decode step over rows [0, rows) of ``state``; returns (new tokens [rows], logits [rows, V]).

    ``key_positions`` = ``state.key_positions[:kv_len]``: the step attends over cache positions
    [0, kv_len). Static shapes, no host synchronisation, every write in place into ``state``.
    """
    x, positions = step_inputs(model, state, rows)
    for layer, cache in zip(model.language.model.layers, state.cache.layers):
        x = layer_step(layer, x, positions, cache, key_positions, rows)
    return step_outputs(model, state, x, positions, rows, full)


def layer_kind(layer: nn.Module) -> str:
    """"moe" or "dense": layers of one kind share one compiled region."""
    return "moe" if isinstance(layer.mlp, MoE) else "dense"


def _compiled_copy(function: Callable, name: str) -> Callable:
    """``torch.compile(fullgraph=True)`` of a private copy of ``function``'s code: Dynamo keeps one
    cache (and recompile limit) per code object, so each region gets its own and none evicts another."""
    copy = types.FunctionType(function.__code__.replace(), function.__globals__, name)
    return torch.compile(copy, fullgraph=True, dynamic=None)


class CompiledStep:
    """The decode step as compiled regions: made on first use, each compiled at its first call."""

    def __init__(self, model: DeepseekVL2, state: "DecodeState") -> None:
        self.model = model
        self.state = state
        self.layers = list(zip(model.language.model.layers, state.cache.layers))
        self.kinds = [layer_kind(layer) for layer, _ in self.layers]
        self.regions: dict[tuple[str, int, bool], Callable] = {}

    def _region(self, part: str, function: Callable, rows: int, full: bool = False) -> Callable:
        key = (part, rows, full)
        if key not in self.regions:
            self.regions[key] = _compiled_copy(function, f"{part}_rows{rows}{'_full' if full else ''}")
        return self.regions[key]

    def compiled_rows(self) -> set[tuple[int, bool]]:
        """The (rows, full) whose every region exists."""
        outputs = {(rows, full) for part, rows, full in self.regions if part == "outputs"}
        return {(rows, full) for rows, full in outputs
                if all((kind, rows, False) in self.regions for kind in set(self.kinds))
                and ("inputs", rows, False) in self.regions}

    def __call__(self, key_positions: torch.Tensor, rows: int, full: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """One step over rows [0, rows) (see :func:`decode_step`), region by region."""
        x, positions = self._region("inputs", step_inputs, rows)(self.model, self.state, rows)
        for (layer, cache), kind in zip(self.layers, self.kinds):
            x = self._region(kind, layer_step, rows)(layer, x, positions, cache, key_positions, rows)
        return self._region("outputs", step_outputs, rows, full)(self.model, self.state, x, positions, rows, full)

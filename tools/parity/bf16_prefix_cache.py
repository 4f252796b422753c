"""The bf16 check of a conversation's second turn run with the prefix cache.

The second turn goes through the :class:`~deepseek_vl2.engine.scheduler.BatchScheduler` after the
first, so it reuses the first turn's KV (``stats.cached_tokens``) and prefills only the rest. Its
logits are compared with the float32-storage and float64 reference runs of the whole second-turn
sequence (prompt and the tokens it generated), each an uncached forward
(:func:`~tools.parity.bf16_check.reference_runs`): the cached run is held to the bounds an
uncached bf16 run is held to, over the positions it computed itself — the rest of the prompt
after the reused KV (read at the final norm) and every generated token's logits (the
scheduler's ``record_logits``); the reused positions reach them through attention.

The scheduler calls no :class:`~deepseek_vl2.model.moe.Routing`, so :class:`PositionRouting`
records and replays expert choices by sequence position with module hooks: a replayed run is the
"routing held" one of bound 1 across both turns and the decode steps. Bound 1 applies to the held
run's compared positions; bound 2 to the free run's compared positions before the first routing
flip anywhere in the sequence (reused positions included: a flip there reaches every later
position through the cache); bound 3 to the free run's first-MoE-layer choices at the compared
positions (their inputs passed no MoE layer, so no flip reached them).

A generated token is chosen from the run's own logits: where the held or free run chooses another
token than the sequence the references ran on, the positions after it have other inputs, and the
comparison ends at that token's logits.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Optional, Sequence

import torch
from PIL import Image

from deepseek_vl2.engine.generation import Generator
from deepseek_vl2.engine.prefix_cache import common_prefix
from deepseek_vl2.engine.sampling import SamplingParams
from deepseek_vl2.engine.scheduler import BatchScheduler
from deepseek_vl2.inputs.processor import ProcessedInputs
from deepseek_vl2.model.moe import Gate, MoE
from deepseek_vl2.model.multimodal import DeepseekVL2

from tools.parity.bf16_bounds import Bf16Runs, GateRecord
from tools.parity.bf16_check import ReferenceRuns, gate_margin


def _by_position(chunks: Sequence[tuple[torch.Tensor, torch.Tensor]], length: int) -> torch.Tensor:
    """Rows [length, ...] from (positions [n], values [n, ...]) chunks, a later chunk's row winning:
    what the cache holds at a position is what was last computed there."""
    if not chunks:
        raise ValueError("nothing was recorded")
    out = torch.full((length, *chunks[0][1].shape[1:]), float("nan"), dtype=torch.float64)
    for positions, values in chunks:
        if int(positions.max()) >= length:
            raise ValueError(f"a forward reached position {int(positions.max())}, past the {length} recorded")
        out[positions] = values.to(torch.float64)
    return out


class PositionRouting:
    """Hooks on a bf16 model run by the scheduler (one row per step: ``max_batch=1``): records,
    per sequence position, each MoE layer's expert ids, the first MoE gate's scores and the logits
    of the final norm's output; with ``forced`` (ids [T, k] per MoE layer, indexed by position),
    every MoE layer uses those ids, as ``Routing(forced=...)`` does in one forward."""

    def __init__(self, model: DeepseekVL2, forced: Optional[list[torch.Tensor]] = None) -> None:
        self.model = model
        self.forced = forced
        self.gates = [m.gate for m in model.modules() if isinstance(m, MoE)]
        self._positions = torch.empty(0, dtype=torch.long)
        self._ids: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in self.gates]
        self._scores: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._logits: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._hooks: list = []

    def __enter__(self) -> "PositionRouting":
        layers = self.model.language.model.layers
        self._hooks.append(layers[0].register_forward_pre_hook(self._take_positions))
        for index, gate in enumerate(self.gates):
            if self.forced is not None:
                self._hooks.append(gate.register_forward_pre_hook(self._replay(index)))
            self._hooks.append(gate.register_forward_hook(self._record(index)))
        self._hooks.append(self.model.language.model.norm.register_forward_hook(self._record_logits))
        return self

    def __exit__(self, *exc_info: object) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()

    def _take_positions(self, layer: torch.nn.Module, args: tuple) -> None:
        positions = args[1].reshape(-1).cpu()
        if positions.numel() != args[0].shape[0] * args[0].shape[1] or args[0].shape[0] != 1:
            raise ValueError("PositionRouting follows one sequence: run the scheduler with max_batch=1")
        self._positions = positions

    def _replay(self, index: int) -> Callable:
        def pre_hook(gate: Gate, args: tuple) -> tuple:
            return args[0], self.forced[index][self._positions].to(args[0].device)
        return pre_hook

    def _record(self, index: int) -> Callable:
        def hook(gate: Gate, args: tuple, output: tuple) -> None:
            self._ids[index].append((self._positions, output[1].cpu()))
            if index == 0:
                self._scores.append((self._positions, gate.scores(args[0]).cpu()))
        return hook

    def _record_logits(self, norm: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
        logits = self.model.language.logits(output)
        self._logits.append((self._positions, logits.reshape(-1, logits.shape[-1]).cpu()))

    def chosen(self, length: int) -> list[torch.Tensor]:
        """Ids [length, k] per MoE layer, by position (the last choice made there)."""
        return [_by_position(chunks, length).long() for chunks in self._ids]

    def first_gate(self, rows: slice, length: int) -> Optional[GateRecord]:
        """The first MoE gate's record at positions ``rows``."""
        if not self.gates:
            return None
        scores = _by_position(self._scores, length)[rows]
        return GateRecord(scores, self.chosen(length)[0][rows], gate_margin(self.gates[0], scores))

    def logits(self, length: int) -> torch.Tensor:
        """Logits [length, V] float64 by position (NaN where nothing was computed)."""
        return _by_position(self._logits, length)


@dataclass
class Conversation:
    """Two turns: the first (with its images), then the second after it and the first's answer."""

    first: ProcessedInputs
    second: ProcessedInputs
    answer: list[int]  # the second turn's generated tokens, as the free cached run chose them

    @property
    def sequence(self) -> ProcessedInputs:
        """The second turn's prompt followed by its answer but the last token: what the references run on."""
        added = torch.tensor(self.answer[:-1], dtype=torch.long)
        return replace(self.second, input_ids=torch.cat([self.second.input_ids.reshape(-1), added]),
                       images_seq_mask=torch.cat([self.second.images_seq_mask.reshape(-1),
                                                  torch.zeros(added.numel(), dtype=torch.bool)]))


@dataclass
class CachedRun:
    """The second turn as the scheduler ran it after the first, and what the hooks recorded."""

    cached_tokens: int
    prompt_tokens: int
    tokens: list[int]
    step_logits: list[torch.Tensor]
    routing: PositionRouting


def converse(generator: Generator, first_prompt: str, images: Sequence[Image.Image], second_prompt: str,
             params: SamplingParams) -> Conversation:
    """Run the first turn, then the second after it and its answer, both with the prefix cache, the
    model choosing its experts; the conversation (its second turn's answer included)."""
    first = generator.prepare(first_prompt, images)
    generator.prefix_cache.clear()
    with BatchScheduler(generator) as scheduler:
        done = scheduler.run(first, params)
        tokenizer = generator.processor.tokenizer
        answer = tokenizer.decode([t for t in done.tokens if t != generator.eos_id], skip_special_tokens=True)
        history = [{"role": "user", "content": first_prompt}, {"role": "assistant", "content": answer}]
        second = generator.prepare(second_prompt, images, history=history)
        second_answer = scheduler.run(second, params).tokens
    return Conversation(first, second, list(second_answer))


def run_cached(generator: Generator, conversation: Conversation, params: SamplingParams,
               forced: Optional[list[torch.Tensor]] = None) -> CachedRun:
    """Both turns through the scheduler again from an empty prefix cache, the expert choices
    replayed by position from ``forced`` (ids [T, k] per MoE layer) or, without, the model's own."""
    if generator.engine.state.slots != 1:
        raise ValueError("the run is recorded by position: load the generator with max_batch=1")
    routing = PositionRouting(generator.model, forced)
    generator.prefix_cache.clear()
    with routing, BatchScheduler(generator) as scheduler:
        scheduler.run(conversation.first, params)
        done = scheduler.run(conversation.second, params, record_logits=True)
    return CachedRun(done.stats.cached_tokens, done.stats.prompt_tokens, list(done.tokens), done.step_logits, routing)


def compared_rows(run: CachedRun, conversation: Conversation) -> slice:
    """The positions whose logits the run computed itself on the references' inputs: from the
    first not reused to the logits of its first generated token that differs from the sequence's."""
    agreed = common_prefix(torch.tensor(run.tokens), torch.tensor(conversation.answer))
    last = run.prompt_tokens - 1 + min(agreed, len(run.tokens) - 1, len(conversation.answer) - 1)
    return slice(run.cached_tokens, last + 1)


def cached_bf16_runs(held: CachedRun, free: CachedRun, conversation: Conversation,
                     reference: ReferenceRuns) -> Bf16Runs:
    """The held and free cached runs with the references, over the positions both computed
    themselves (:func:`compared_rows`), for :func:`~tools.parity.bf16_bounds.bf16_figures`.

    The generated tokens' logits are the scheduler's own (``step_logits``); the earlier rows
    come from the final-norm hook (they equal the scheduler's where both exist)."""
    length = conversation.sequence.input_ids.numel()
    first, second = compared_rows(held, conversation), compared_rows(free, conversation)
    if first.start != second.start:
        raise ValueError(f"the held run reused {first.start} positions, the free run {second.start}")
    rows = slice(first.start, min(first.stop, second.stop))

    def logits(run: CachedRun) -> torch.Tensor:
        by_position = run.routing.logits(length)
        sampled = run.prompt_tokens - 1  # the first generated token's logits
        for step, row in enumerate(run.step_logits[: rows.stop - sampled]):
            by_position[sampled + step] = row.to(torch.float64)
        if by_position[rows].isnan().any():
            raise ValueError(f"the run computed no logits at some of positions {rows.start}..{rows.stop - 1}")
        return by_position[rows]

    gate_f32 = gate_f64 = None
    if reference.gate_f32 is not None:
        gate_f32, gate_f64 = (GateRecord(g.scores[rows], g.ids[rows], g.margin[rows])
                              for g in (reference.gate_f32, reference.gate_f64))
    return Bf16Runs(reference.f32[rows], reference.f64[rows], logits(held), logits(free), gate_f32, gate_f64,
                    free.routing.first_gate(rows, length), [ids.cpu() for ids in reference.routing],
                    free.routing.chosen(length), first_position=rows.start)

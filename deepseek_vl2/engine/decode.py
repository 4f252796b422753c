"""The persistent decode state and the one static-shape decode step (compiled on request).

:class:`DecodeState` is allocated once, when the :class:`~.generation.Generator` is built (Cog
setup), for ``slots`` concurrent requests of up to ``max_len`` tokens; every request reuses it.
A request owns one slot, and slot ``s`` is row ``s`` of every buffer:

* the KV cache, ``max_len + 1`` positions per slot: the extra column is scratch where rows that
  are idle in a step write (and it is never read);
* ``tokens`` / ``positions`` [slots]: each row's last token and the position it goes to;
* ``seen`` [slots, V]: ids of the prompt and of the tokens generated so far (repetition penalty);
* ``columns``: each row's sampling parameters as tensors; ``uniforms`` [slots, 1]: its draw;
* ``active`` [slots]: the rows that advance in the next step.

One step (:func:`decode_step`) covers rows ``[0, rows)`` for a batch bucket ``rows`` and a KV
length bucket ``kv_len``: embed → every layer → final norm → logits → sampling → write the new
tokens, positions and seen marks back into the state. Inactive rows compute at the scratch
position and change nothing, so any subset of slots can step together and a step with no
active row is a harmless warm-up. The only value the host reads is the new token ids.

:class:`DecodeEngine` runs that step eagerly, or through ``torch.compile(fullgraph=True)`` (one
compiled function per (rows, mode); ``kv_len`` is a dynamic dimension, so KV buckets do not
recompile) and, on CUDA, replays it as one CUDA graph per (rows, kv_len, mode), captured on the
first use of that bucket or in :meth:`DecodeEngine.warmup`.
"""
from __future__ import annotations

import logging
import threading
import time
import types
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Iterable, Optional, Sequence

import torch

from deepseek_vl2.model.kv_cache import KVCache
from deepseek_vl2.model.multimodal import DeepseekVL2
from .sampling import RowColumns, SamplingParams, choose_tokens, draw_uniforms, needs_processing

log = logging.getLogger(__name__)

MODES = ("greedy", "full")  # greedy: plain argmax of the raw logits; full: the whole sampler


class SlotsExhaustedError(RuntimeError):
    """Every slot of the persistent decode state is held by a request."""


def batch_buckets(slots: int) -> list[int]:
    """Row counts a step is padded to: powers of two below ``slots``, then ``slots`` itself."""
    sizes, size = [], 1
    while size < slots:
        sizes.append(size)
        size *= 2
    return sizes + [slots]


@dataclass
class DecodeState:
    """Every buffer the decode step touches, allocated once (see the module docstring)."""

    cache: KVCache
    tokens: torch.Tensor
    positions: torch.Tensor
    seen: torch.Tensor
    columns: RowColumns
    uniforms: torch.Tensor
    active: torch.Tensor
    key_positions: torch.Tensor  # arange(max_len): sliced to kv_len, it carries the KV length
    max_len: int
    free: list[int] = field(default_factory=list)

    @classmethod
    def allocate(cls, model: DeepseekVL2, slots: int, max_len: int) -> "DecodeState":
        """Buffers for ``slots`` requests of up to ``max_len`` tokens on the model's device."""
        device, vocab = model.device, model.config.language.vocab_size
        return cls(
            cache=model.new_cache(slots, max_len + 1),
            tokens=torch.zeros(slots, dtype=torch.long, device=device),
            positions=torch.full((slots,), max_len, dtype=torch.long, device=device),
            seen=torch.zeros(slots, vocab, dtype=torch.bool, device=device),
            columns=RowColumns.empty(slots, device),
            uniforms=torch.zeros(slots, 1, dtype=torch.float64, device=device),
            active=torch.zeros(slots, dtype=torch.bool, device=device),
            key_positions=torch.arange(max_len, device=device),
            max_len=max_len,
            free=list(range(slots)),
        )

    @property
    def slots(self) -> int:
        return self.tokens.shape[0]

    def nbytes(self) -> int:
        """Device memory held by the state (KV cache included)."""
        tensors = (self.tokens, self.positions, self.seen, self.uniforms, self.active, *self.columns.tensors())
        return self.cache.nbytes() + sum(t.numel() * t.element_size() for t in tensors)


def decode_step(model: DeepseekVL2, state: DecodeState, key_positions: torch.Tensor, *, rows: int,
                full: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """One decode step over rows [0, rows) of ``state``; returns (new tokens [rows], logits [rows, V]).

    ``key_positions`` = ``state.key_positions[:kv_len]``: the step attends over cache positions
    [0, kv_len). ``full`` False: every active row is plain greedy (argmax of the raw logits).
    Static shapes, no host synchronisation, every write in place into ``state``.
    """
    active = state.active[:rows]
    last = state.tokens[:rows]
    stored = state.positions[:rows]
    positions = torch.where(active, stored, state.max_len)  # idle rows use the scratch column
    kv_len = key_positions.shape[0]
    logits = model.forward_tokens(last.unsqueeze(1), positions.unsqueeze(1), state.cache, slice(0, rows), kv_len)
    logits = logits[:, -1]
    seen = state.seen[:rows]
    columns = state.columns.head(rows) if full else None
    new = torch.where(active, choose_tokens(logits, seen, columns, state.uniforms[:rows]), last)
    last.copy_(new)
    stored.copy_(torch.where(active, positions + 1, stored))
    index = new.unsqueeze(1)
    seen.scatter_(1, index, seen.gather(1, index) | active.unsqueeze(1))
    return new, logits


class DecodeEngine:
    """Owns the :class:`DecodeState`, hands out its slots, and runs (compiled) decode steps."""

    def __init__(self, model: DeepseekVL2, slots: int, max_len: int, compile: bool, kv_bucket: int) -> None:
        if slots < 1 or max_len < 2:
            raise ValueError(f"the decode state needs slots >= 1 and max_len >= 2, got {slots} and {max_len}")
        self.model = model
        self.compiled = compile
        self.kv_bucket = kv_bucket
        self.use_graphs = compile and model.device.type == "cuda"
        self._lock = threading.RLock()
        self._allocate(slots, max_len)

    def _allocate(self, slots: int, max_len: int) -> None:
        started = time.perf_counter()
        self.state = DecodeState.allocate(self.model, slots, max_len)
        self._functions: dict[tuple[int, bool], Callable] = {}
        self._graphs: dict[tuple[int, int, bool], tuple[torch.cuda.CUDAGraph, tuple]] = {}
        self._graph_pool = torch.cuda.graph_pool_handle() if self.use_graphs else None
        self._active_slots: Optional[frozenset[int]] = None
        log.info("decode state: %d slot(s) x %d tokens, %.0f MiB on %s, allocated in %.2f s", slots, max_len,
                 self.state.nbytes() / 2**20, self.model.device, time.perf_counter() - started)

    # ----------------------------------------------------------------------------- slots
    @property
    def slots(self) -> int:
        return self.state.slots

    @property
    def max_len(self) -> int:
        return self.state.max_len

    @property
    def free_slots(self) -> list[int]:
        """Slots no request holds (a copy)."""
        with self._lock:
            return list(self.state.free)

    def reserve(self, slots: int, max_len: int) -> None:
        """Grow the state to at least ``slots`` × ``max_len`` (setup time: no slot may be held)."""
        with self._lock:
            if slots <= self.slots and max_len <= self.max_len:
                return
            if len(self.state.free) != self.slots:
                raise RuntimeError("the decode state cannot grow while requests hold slots")
            self._allocate(max(slots, self.slots), max(max_len, self.max_len))

    def acquire(self) -> int:
        """The lowest free slot (low slots keep the stepped rows few); raises SlotsExhaustedError."""
        with self._lock:
            if not self.state.free:
                raise SlotsExhaustedError(f"all {self.slots} decode slot(s) are in use; retry shortly")
            slot = min(self.state.free)
            self.state.free.remove(slot)
            return slot

    def release(self, slot: int) -> None:
        """Give back a slot :meth:`acquire` handed out (its rows go idle at the next step).

        Raises ValueError for a slot that is not held: a second release would let two requests
        share one row."""
        with self._lock:
            if not 0 <= slot < self.slots or slot in self.state.free:
                raise ValueError(f"slot {slot} is not held (the state has slots 0 to {self.slots - 1})")
            self.state.free.append(slot)
            self._active_slots = None

    def start_row(self, slot: int, token: int, position: int, seen: torch.Tensor, params: SamplingParams) -> None:
        """Write a request's row before its first decode step: last token, its position, seen ids, parameters."""
        state = self.state
        with self._lock:
            state.tokens[slot].fill_(token)
            state.positions[slot].fill_(position)
            state.seen[slot].copy_(seen.reshape(-1))
            state.columns.write_row(slot, params)

    # ----------------------------------------------------------------------------- steps
    def bucket(self, slots: Iterable[int], lengths: Iterable[int]) -> tuple[int, int]:
        """(rows, kv_len) of the step for requests in ``slots`` whose caches hold ``lengths`` tokens."""
        highest = max(slots) + 1
        rows = next(size for size in batch_buckets(self.slots) if size >= highest)
        needed = max(lengths) + 1
        kv_len = min(self.max_len, -(-needed // self.kv_bucket) * self.kv_bucket)
        return rows, kv_len

    def _function(self, rows: int, full: bool) -> Callable:
        key = (rows, full)
        if key not in self._functions:
            step = decode_step
            if self.compiled:  # a private copy of the code: Dynamo keeps one cache (and recompile limit) per code object
                step = types.FunctionType(decode_step.__code__.replace(), decode_step.__globals__,
                                          f"decode_step_rows{rows}_{MODES[full]}")
            fn = partial(step, self.model, self.state, rows=rows, full=full)
            self._functions[key] = torch.compile(fn, fullgraph=True, dynamic=None) if self.compiled else fn
        return self._functions[key]

    def _key_positions(self, kv_len: int) -> torch.Tensor:
        view = self.state.key_positions[:kv_len]
        if self.compiled:
            torch._dynamo.mark_dynamic(view, 0, min=2, max=self.max_len)
        return view

    def _run(self, rows: int, kv_len: int, full: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.use_graphs:
            return self._function(rows, full)(self._key_positions(kv_len))
        key = (rows, kv_len, full)
        if key not in self._graphs:
            self._graphs[key] = self._capture(rows, kv_len, full)
        graph, outputs = self._graphs[key]
        graph.replay()
        return outputs

    def _capture(self, rows: int, kv_len: int, full: bool) -> tuple[torch.cuda.CUDAGraph, tuple]:
        """Warm the compiled step up on a side stream with no row active, then capture it."""
        fn = self._function(rows, full)
        saved = self.state.active.clone()
        self.state.active.zero_()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                fn(self._key_positions(kv_len))
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._graph_pool):
            outputs = fn(self._key_positions(kv_len))
        self.state.active.copy_(saved)
        return graph, outputs

    @torch.inference_mode()
    def step(self, slots: Sequence[int], lengths: Sequence[int], params: Sequence[SamplingParams],
             generators: Sequence[Optional[torch.Generator]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Advance the requests in ``slots`` (rows written by :meth:`start_row`) by one token.

        ``lengths``: tokens in each request's cache. Returns device tensors indexed by slot:
        new tokens [rows] and logits [rows, V] (rows >= max(slots) + 1; other rows are
        meaningless). On CUDA they are the captured graph's outputs: the next step overwrites them.
        """
        with self._lock:
            state = self.state
            rows, kv_len = self.bucket(slots, lengths)
            current = frozenset(slots)
            if current != self._active_slots:  # the batch changed: rewrite the active mask
                mask = torch.zeros(state.slots, dtype=torch.bool)
                mask[list(current)] = True
                state.active.copy_(mask)
                self._active_slots = current
            for slot, generator, p in zip(slots, generators, params):
                if not p.is_greedy:
                    draw_uniforms([generator], [True], state.uniforms[slot : slot + 1])
            return self._run(rows, kv_len, needs_processing(params))

    # ----------------------------------------------------------------------------- warm-up
    def warmup(self, rows: Optional[Sequence[int]] = None, kv_lens: Optional[Sequence[int]] = None,
               modes: Sequence[str] = MODES, max_seconds: Optional[float] = None) -> dict[str, float]:
        """Compile (and on CUDA capture) the step for every (rows, kv_len, mode) bucket given.

        Defaults: every batch bucket, every KV bucket, both modes. Stops starting new buckets
        once ``max_seconds`` have passed (the rest compile on first use). Returns seconds per
        bucket, keyed "rows=R kv=K mode=M", and logs each. No request's state changes.
        """
        rows = list(rows or batch_buckets(self.slots))
        kv_lens = list(kv_lens or range(self.kv_bucket, self.max_len + self.kv_bucket, self.kv_bucket))
        timings: dict[str, float] = {}
        started = time.perf_counter()
        with self._lock, torch.inference_mode():
            saved = self.state.active.clone()
            self.state.active.zero_()
            self._active_slots = None
            try:
                for mode in modes:
                    for r in rows:
                        for kv in kv_lens:
                            if max_seconds is not None and time.perf_counter() - started > max_seconds:
                                log.info("warm-up stopped after %.1f s (limit %.1f s)", time.perf_counter() - started,
                                         max_seconds)
                                return timings
                            t0 = time.perf_counter()
                            self._run(min(r, self.slots), min(kv, self.max_len), mode == "full")
                            if self.model.device.type == "cuda":
                                torch.cuda.synchronize()
                            timings[f"rows={r} kv={kv} mode={mode}"] = seconds = time.perf_counter() - t0
                            log.info("warm-up rows=%d kv_len=%d mode=%s: %.2f s", r, kv, mode, seconds)
            finally:
                self.state.active.copy_(saved)
        log.info("warm-up: %d bucket(s) in %.1f s (compiled: %s, CUDA graphs: %s)", len(timings),
                 time.perf_counter() - started, self.compiled, self.use_graphs)
        return timings

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

:class:`DecodeEngine` runs that step eagerly, or through ``torch.compile(fullgraph=True)``, and
on CUDA replays it as CUDA graphs (rules in docs/engine.md): one compiled function per (rows
bucket, mode), ``kv_len`` dynamic (``mark_dynamic`` without bounds); :meth:`DecodeEngine.warmup`
(setup) compiles every (rows, mode), ``full`` first, then on CUDA captures one graph per
(rows, kv_len, mode) within a time budget. After a warm-up the engine is sealed: a step never
compiles and never captures (an uncaptured bucket runs un-graphed, an uncompiled one eagerly);
only :meth:`DecodeEngine.warmup` captures.
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
from deepseek_vl2.model.rope import place_rotary_tables
from .sampling import RowColumns, SamplingParams, choose_tokens, draw_uniforms, needs_processing

log = logging.getLogger(__name__)

MODES = ("greedy", "full")  # greedy: plain argmax of the raw logits; full: the whole sampler
WARMUP_MODES = ("full", "greedy")  # the default request (temperature 0.1) samples: its mode is ready first


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
        # CUDA graphs: for a compiled step on CUDA; a caller may set it for the eager step before warmup()
        self.use_graphs = compile and model.device.type == "cuda"
        self.sealed = False  # set by warmup(): from then on a step never compiles
        self.warmup_summary: dict[str, object] = {}
        if compile:  # before any trace: the rotary tables live on the device, no trace writes them
            place_rotary_tables(model, model.device)
        self._lock = threading.RLock()
        self._allocate(slots, max_len)

    def _allocate(self, slots: int, max_len: int) -> None:
        started = time.perf_counter()
        self.state = DecodeState.allocate(self.model, slots, max_len)
        self._functions: dict[tuple[int, bool], Callable] = {}
        self._graphs: dict[tuple[int, int, bool], tuple[torch.cuda.CUDAGraph, tuple]] = {}
        self._graph_pool = None  # made at the first capture
        self._active_slots: Optional[frozenset[int]] = None
        self._eager_fallbacks: set[tuple[int, bool]] = set()
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

    def acquire(self, slot: Optional[int] = None) -> int:
        """Free slot ``slot``, or by default the lowest free one (low slots keep the stepped rows few);
        raises SlotsExhaustedError when none is free, ValueError when ``slot`` is not."""
        with self._lock:
            if not self.state.free:
                raise SlotsExhaustedError(f"all {self.slots} decode slot(s) are in use; retry shortly")
            if slot is not None and slot not in self.state.free:
                raise ValueError(f"slot {slot} is not free")
            slot = min(self.state.free) if slot is None else slot
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

    def _compiled_function(self, rows: int, full: bool) -> Callable:
        """The compiled step of (rows, mode), made on first use (it compiles at its first call)."""
        key = (rows, full)
        if key not in self._functions:
            # A private copy of the code, compiled itself: Dynamo keeps one cache (and recompile
            # limit, 8) per code object. (Compiling a functools.partial instead compiles one shared
            # wrapper: every (rows, mode) lands in the same cache and the ninth runs eagerly.)
            step = types.FunctionType(decode_step.__code__.replace(), decode_step.__globals__,
                                      f"decode_step_rows{rows}_{MODES[full]}")
            compiled = torch.compile(step, fullgraph=True, dynamic=None)
            model, state = self.model, self.state
            self._functions[key] = lambda key_positions: compiled(model, state, key_positions, rows=rows, full=full)
        return self._functions[key]

    def _step_function(self, rows: int, full: bool) -> Callable:
        """What a step of (rows, mode) runs outside a CUDA graph: the compiled function, or the eager
        step when compiling is off or the engine is sealed and this (rows, mode) was not compiled."""
        if self.compiled and ((rows, full) in self._functions or not self.sealed):
            return self._compiled_function(rows, full)
        if self.compiled and (rows, full) not in self._eager_fallbacks:
            self._eager_fallbacks.add((rows, full))
            log.warning("decode rows=%d mode=%s was not compiled in the warm-up: it runs eagerly", rows, MODES[full])
        return partial(decode_step, self.model, self.state, rows=rows, full=full)

    def _key_positions(self, kv_len: int) -> torch.Tensor:
        view = self.state.key_positions[:kv_len]
        if self.compiled:  # no min/max: bounds turn any shape guard a backend adds into an error
            torch._dynamo.mark_dynamic(view, 0)
        return view

    def _run(self, rows: int, kv_len: int, full: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """One step: the captured graph of (rows, kv_len, mode) if there is one, else the step
        function un-graphed. Never captures (only :meth:`warmup` does)."""
        captured = self._graphs.get((rows, kv_len, full))
        if captured is None:
            return self._step_function(rows, full)(self._key_positions(kv_len))
        graph, outputs = captured
        graph.replay()
        return outputs

    def _capture(self, rows: int, kv_len: int, full: bool) -> tuple[torch.cuda.CUDAGraph, tuple]:
        """Warm the step (compiled, or eager) up on a side stream with no row active, then capture it.

        Only :meth:`warmup` calls this, in setup, when no other thread uses the device; the
        thread-local capture mode also keeps another thread's allocation from failing a capture.
        """
        fn = self._step_function(rows, full)
        self._graph_pool = self._graph_pool or torch.cuda.graph_pool_handle()
        saved = self.state.active.clone()
        self.state.active.zero_()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                fn(self._key_positions(kv_len))
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._graph_pool, capture_error_mode="thread_local"):
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
    def kv_buckets(self) -> list[int]:
        """Every ``kv_len`` a step can have: multiples of ``kv_bucket`` up to ``max_len`` (the last
        one clipped to it)."""
        return sorted({min(kv, self.max_len) for kv in range(self.kv_bucket, self.max_len + self.kv_bucket,
                                                             self.kv_bucket)})

    def warmup(self, rows: Optional[Sequence[int]] = None, kv_lens: Optional[Sequence[int]] = None,
               modes: Sequence[str] = WARMUP_MODES, max_seconds: Optional[float] = None) -> dict[str, float]:
        """Compile every (rows, mode) given, then on CUDA capture every (rows, kv_len, mode) graph;
        seals the engine (see the module docstring).

        Defaults: every batch bucket, every KV bucket, the ``full`` mode before ``greedy``. Stops
        starting new work once ``max_seconds`` have passed (a compile under way is not cut short);
        what was not reached runs un-graphed, or eagerly if not compiled, never compiling later.
        Returns seconds per bucket, keyed "rows=R kv=K mode=M"; :attr:`warmup_summary` holds the
        compile count per mode, the graphs captured, their seconds and memory, all logged. Setup
        only: no other thread may use the device meanwhile. No request's state changes.
        """
        rows = [min(r, self.slots) for r in (rows or batch_buckets(self.slots))]
        kv_lens = [min(kv, self.max_len) for kv in (kv_lens or self.kv_buckets())]
        modes = [m for m in WARMUP_MODES if m in modes] + [m for m in modes if m not in WARMUP_MODES]
        timings: dict[str, float] = {}
        started = time.perf_counter()
        summary = {"compiles": {}, "compile_seconds": {}, "graphs": 0, "graph_seconds": 0.0, "graph_memory_mib": 0.0,
                   "stopped_by_budget": False}

        def over_budget() -> bool:
            if max_seconds is not None and time.perf_counter() - started > max_seconds:
                summary["stopped_by_budget"] = True
                return True
            return False

        def timed(key: str, work: Callable[[], object]) -> float:
            t0 = time.perf_counter()
            work()
            if self.model.device.type == "cuda":
                torch.cuda.synchronize()
            timings[key] = seconds = time.perf_counter() - t0
            log.info("warm-up %s: %.2f s", key, seconds)
            return seconds

        from torch._dynamo.utils import counters  # Dynamo's own count of the graphs it compiled

        with self._lock, torch.inference_mode():
            saved = self.state.active.clone()
            self.state.active.zero_()
            self._active_slots = None
            self.sealed = False  # the warm-up itself may compile
            try:
                # 1. compile (or, eager, run) each (rows, mode): every kv_len without graphs, the first with them
                for mode in modes:
                    graphs_before = counters["stats"]["unique_graphs"]
                    for r in dict.fromkeys(rows):
                        for kv in (kv_lens[:1] if self.use_graphs else kv_lens):
                            if over_budget():
                                break
                            seconds = timed(f"rows={r} kv={kv} mode={mode}",
                                            partial(self._step_function(r, mode == "full"), self._key_positions(kv)))
                            summary["compile_seconds"][mode] = summary["compile_seconds"].get(mode, 0.0) + seconds
                    summary["compiles"][mode] = counters["stats"]["unique_graphs"] - graphs_before
                # 2. on CUDA, capture every graph a step can reach
                if self.use_graphs:
                    reserved = torch.cuda.memory_reserved()
                    graphs_started = time.perf_counter()
                    buckets = [(r, kv, m == "full") for m in modes for r in dict.fromkeys(rows) for kv in kv_lens]
                    for key in [b for b in buckets if b not in self._graphs]:
                        if over_budget():
                            break
                        try:  # a capture that fails leaves its bucket (and those after it) un-graphed
                            timed(f"rows={key[0]} kv={key[1]} mode={MODES[key[2]]}",
                                  lambda: self._graphs.__setitem__(key, self._capture(*key)))
                        except Exception as error:  # noqa: BLE001 - setup must not fail on a capture
                            log.exception("CUDA graph capture of %s failed: un-graphed from here", key)
                            summary["capture_error"] = f"{type(error).__name__}: {error}"[:500]
                            break
                        summary["graphs"] += 1
                    summary["graph_seconds"] = time.perf_counter() - graphs_started
                    summary["graph_memory_mib"] = (torch.cuda.memory_reserved() - reserved) / 2**20
            finally:
                self.sealed = True  # whatever was sealed before: a warm-up seals
                self.state.active.copy_(saved)
        summary["seconds"] = time.perf_counter() - started
        self.warmup_summary = summary
        log.info("warm-up: %.1f s; compiles per mode %s (%s s); %d CUDA graph(s) captured in %.1f s using %.0f MiB%s "
                 "(compiled: %s, CUDA graphs: %s)", summary["seconds"], summary["compiles"],
                 {m: round(v, 1) for m, v in summary["compile_seconds"].items()}, summary["graphs"],
                 summary["graph_seconds"], summary["graph_memory_mib"],
                 "; stopped by its time budget: the rest runs un-graphed or eager" if summary["stopped_by_budget"] else "",
                 self.compiled, self.use_graphs)
        return timings

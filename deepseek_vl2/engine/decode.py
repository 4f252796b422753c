"""The persistent decode state and the engine that runs decode steps over it.

:class:`DecodeState` is allocated once, when the :class:`~.generation.Generator` is built (Cog
setup), for ``slots`` concurrent requests of up to ``max_len`` tokens; every request reuses it.
A request owns one slot, and slot ``s`` is row ``s`` of every buffer:

* the KV cache, ``max_len + 1`` positions per slot: the extra column is scratch where rows that
  are idle in a step write (and it is never read);
* ``tokens`` / ``positions`` [slots]: each row's last token and the position it goes to;
* ``seen`` [slots, V]: ids of the prompt and of the tokens generated so far (repetition penalty);
* ``columns``: each row's sampling parameters as tensors; ``uniforms`` [slots, 1]: its draw;
* ``active`` [slots]: the rows that advance in the next step.

The step itself lives in :mod:`.step`. :class:`DecodeEngine` runs it one way per device (rules
in docs/engine.md): compiled region by region and replayed as CUDA graphs on CUDA, eager on the
CPU. :meth:`DecodeEngine.warmup` (setup) compiles every region, then on CUDA captures one graph
per (rows, kv_len, mode); if compiling or capturing fails there, or runs past its time budget,
the engine falls back to the eager step for good, logging why. After a warm-up the engine is
sealed: a step never compiles and never captures.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Iterable, Optional, Sequence

import torch

from deepseek_vl2.model.kv_cache import KVCache
from deepseek_vl2.model.multimodal import DeepseekVL2
from deepseek_vl2.model.rope import place_rotary_tables
from .config import WARMUP_SECONDS_ENV
from .sampling import RowColumns, SamplingParams, draw_uniforms, needs_processing
from .step import CompiledStep, Step, decode_step

log = logging.getLogger(__name__)

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
        tensors = (self.tokens, self.positions, self.seen, self.uniforms, self.active, self.key_positions,
                   *self.columns.tensors())
        return self.cache.nbytes() + sum(t.numel() * t.element_size() for t in tensors)


class DecodeEngine:
    """Owns the :class:`DecodeState`, hands out its slots, and runs decode steps (one path per device)."""

    def __init__(self, model: DeepseekVL2, slots: int, max_len: int, compile: bool, kv_bucket: int) -> None:
        if slots < 1 or max_len < 2:
            raise ValueError(f"the decode state needs slots >= 1 and max_len >= 2, got {slots} and {max_len}")
        self.model = model
        self.compiled = compile  # False for good after a fallback
        self.use_graphs = compile and model.device.type == "cuda"  # compiled steps replay as CUDA graphs on CUDA
        self.kv_bucket = kv_bucket
        self.sealed = False  # set by warmup(): from then on a step never compiles
        self.fallback_reason: Optional[str] = None  # why setup fell back to the eager step
        self.warmup_summary: dict[str, object] = {}
        if compile:  # before any trace: the rotary tables live on the device, no trace writes them
            place_rotary_tables(model, model.device)
        self._lock = threading.RLock()
        self._allocate(slots, max_len)

    def _allocate(self, slots: int, max_len: int) -> None:
        started = time.perf_counter()
        self.state = DecodeState.allocate(self.model, slots, max_len)
        self._compiled_step = CompiledStep(self.model, self.state) if self.compiled else None
        self._graphs: dict[tuple[int, int, bool], tuple[torch.cuda.CUDAGraph, tuple]] = {}
        self._graph_pool = None  # made at the first capture
        self._active_slots: Optional[frozenset[int]] = None
        log.info("decode state: %d slot(s) x %d tokens, %.0f MiB on %s, allocated in %.2f s", slots, max_len,
                 self.state.nbytes() / 2**20, self.model.device, time.perf_counter() - started)

    @property
    def path(self) -> str:
        """The decode path in use: "compiled + CUDA graphs", "compiled" (CPU, forced) or "eager"."""
        return "eager" if not self.compiled else "compiled + CUDA graphs" if self.use_graphs else "compiled"

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

    def _step_function(self, rows: int, full: bool) -> Step:
        """The step of (rows, mode) outside a CUDA graph: the compiled regions, or the eager step."""
        if self._compiled_step is not None:
            return partial(self._compiled_step, rows=rows, full=full)
        return partial(decode_step, self.model, self.state, rows=rows, full=full)

    def _key_positions(self, kv_len: int) -> torch.Tensor:
        view = self.state.key_positions[:kv_len]
        if self.compiled:  # no min/max: bounds turn any shape guard a backend adds into an error
            torch._dynamo.mark_dynamic(view, 0)
        return view

    def _run(self, rows: int, kv_len: int, full: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """One step: the captured graph of (rows, kv_len, mode) once the warm-up captured them all,
        else the step function (compiled or eager). Never captures (only :meth:`warmup` does)."""
        captured = self._graphs.get((rows, kv_len, full))
        if captured is None:
            return self._step_function(rows, full)(self._key_positions(kv_len))
        graph, outputs = captured
        graph.replay()
        return outputs

    def _capture(self, rows: int, kv_len: int, full: bool) -> tuple[torch.cuda.CUDAGraph, tuple]:
        """Warm the compiled step up on a side stream with no row active, then capture it whole.

        Only :meth:`warmup` calls this, in setup, when no other thread uses the device; the
        thread-local capture mode also keeps another thread's allocation from failing a capture.
        """
        fn = self._step_function(rows, full)
        self._graph_pool = self._graph_pool or torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                fn(self._key_positions(kv_len))
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._graph_pool, capture_error_mode="thread_local"):
            outputs = fn(self._key_positions(kv_len))
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


    def warmup(self, max_seconds: Optional[float] = None) -> dict[str, float]:
        """Compile every region of every (rows bucket, mode), ``full`` first, then on CUDA capture
        every (rows, kv_len, mode) graph; seals the engine (see the module docstring).

        If a compile or a capture fails, or the work passes ``max_seconds``, the engine falls back
        to the eager step for good (:attr:`fallback_reason` says why; logged). Returns seconds per
        piece of work, keyed "rows=R mode=M" (compiles) and "rows=R kv=K mode=M" (captures);
        :attr:`warmup_summary` holds the counts, seconds and graph memory, all logged in one line.
        Setup only: no other thread may use the device meanwhile. No request's state changes.
        """
        from torch._dynamo.utils import counters  # Dynamo's own count of the graphs it compiled

        timings: dict[str, float] = {}
        started = time.perf_counter()
        summary: dict[str, object] = {"compiles": 0, "compile_seconds": 0.0, "graphs": 0, "graph_seconds": 0.0,
                                      "graph_memory_mib": 0.0}

        def timed(key: str, work: Callable[[], object]) -> None:
            t0 = time.perf_counter()
            work()
            if self.model.device.type == "cuda":
                torch.cuda.synchronize()
            timings[key] = time.perf_counter() - t0
            log.info("warm-up %s: %.2f s", key, timings[key])
            if max_seconds is not None and time.perf_counter() - started > max_seconds:
                raise TimeoutError(f"the warm-up passed its {max_seconds:g} s budget ({WARMUP_SECONDS_ENV}) at {key}")

        with self._lock, torch.inference_mode():
            saved = self.state.active.clone()
            self.state.active.zero_()  # no row active: every step below is side-effect free
            self._active_slots = None
            self.sealed = False  # the warm-up itself may compile
            try:
                if self.compiled:
                    before = counters["stats"]["unique_graphs"]
                    for mode in WARMUP_MODES:
                        for rows in batch_buckets(self.slots):
                            step = self._step_function(rows, mode == "full")
                            timed(f"rows={rows} mode={mode}", partial(step, self._key_positions(self.kv_bucket)))
                    summary["compiles"] = counters["stats"]["unique_graphs"] - before
                    summary["compile_seconds"] = time.perf_counter() - started
                if self.use_graphs:
                    self._capture_all(summary, timed)
            except Exception as error:  # noqa: BLE001 - setup goes on with the eager step
                self._fall_back(f"{type(error).__name__}: {error}"[:500])
            finally:
                self.sealed = True
                self.state.active.copy_(saved)
        summary.update(seconds=time.perf_counter() - started, path=self.path, fallback=self.fallback_reason)
        self.warmup_summary = summary
        log.info("decode warm-up: %.1f s; %d compile(s) in %.1f s; %d CUDA graph(s) captured in %.1f s using %.0f MiB; "
                 "decode path: %s%s", summary["seconds"], summary["compiles"], summary["compile_seconds"],
                 summary["graphs"], summary["graph_seconds"], summary["graph_memory_mib"], self.path,
                 f" (fallback: {self.fallback_reason})" if self.fallback_reason else "")
        return timings

    def _capture_all(self, summary: dict[str, object], timed: Callable[[str, Callable[[], object]], None]) -> None:
        """Capture one CUDA graph per (rows, kv_len, mode) a step can reach, into one memory pool."""
        reserved = torch.cuda.memory_reserved()
        started = time.perf_counter()
        for mode in WARMUP_MODES:
            for rows in batch_buckets(self.slots):
                for kv_len in self.kv_buckets():
                    key = (rows, kv_len, mode == "full")
                    timed(f"rows={rows} kv={kv_len} mode={mode}",
                          lambda: self._graphs.__setitem__(key, self._capture(*key)))
                    summary["graphs"] = len(self._graphs)
                    summary["graph_seconds"] = time.perf_counter() - started
                    summary["graph_memory_mib"] = (torch.cuda.memory_reserved() - reserved) / 2**20

    def _fall_back(self, reason: str) -> None:
        """Run the eager step from now on (setup only): drop the compiled regions and every graph."""
        log.warning("the decode step was not compiled and captured in setup, so it runs eagerly: %s", reason)
        self.fallback_reason = reason
        self.compiled = self.use_graphs = False
        self._compiled_step = None
        self._graphs.clear()
        self._graph_pool = None

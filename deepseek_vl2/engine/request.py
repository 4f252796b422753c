"""One request's state from submission to its last token: :class:`Request` and its :class:`Phase`.

Everything the engine knows about a request lives here: its inputs and sampling parameters,
where it is (:class:`Phase`), the decode-state slot it holds (None when it holds none), the
tokens in its cache, the tokens it generated (and, when asked, the logits each was chosen from),
its random generator, its text streamer, its statistics and, once it ended badly, its error. The decode state (``engine/decode.py``) keeps
only device rows indexed by slot and the list of free slots; a scheduler's handle keeps only
the queue its text is delivered through.
"""
from __future__ import annotations

import enum
import threading
import time
from dataclasses import dataclass, field
from typing import Optional

import torch

from deepseek_vl2.inputs.processor import ProcessedInputs
from .sampling import SamplingParams
from .streaming import TextStreamer


class Phase(enum.Enum):
    """Where a request is; each phase says which fields hold its state.

    WAITING: no slot yet (a scheduler assigns one).
    PREFILLING: holds a slot; prompt chunks are going into its cache rows (``length`` so far).
    SAMPLING: the prompt is in and ``next_logits`` set; its tokens are chosen on the host by
        ``Generator.sample`` from logits, and its seen ids are in ``Request.seen``.
    DECODING: its row of the decode state holds its last token, position, seen ids and sampling
        parameters; the decode step chooses its tokens.
    FINISHED: a stop rule ended it, or it was cancelled or failed (``stats.finish_reason``).
    """

    WAITING = "waiting"
    PREFILLING = "prefilling"
    SAMPLING = "sampling"
    DECODING = "decoding"
    FINISHED = "finished"


@dataclass
class GenerationStats:
    """Counts and timings of one generation (filled as it runs)."""

    prompt_tokens: int = 0
    new_tokens: int = 0
    max_new_tokens: int = 0
    seed: Optional[int] = None
    cached_tokens: int = 0  # leading prompt tokens whose KV a parked slot held (not prefilled again)
    time_to_first_token: float = 0.0
    total_seconds: float = 0.0
    finish_reason: str = ""

    @property
    def tokens_per_second(self) -> float:
        """Decode speed after the first token."""
        decode_time = self.total_seconds - self.time_to_first_token
        return (self.new_tokens - 1) / decode_time if self.new_tokens > 1 and decode_time > 0 else 0.0


@dataclass(eq=False)
class Request:
    """State of one request (see the module docstring); made by ``Generator.new_request``."""

    inputs: ProcessedInputs
    params: SamplingParams
    max_new_tokens: int
    seen: torch.Tensor  # [1, V] bool: prompt and generated ids while SAMPLING (then the decode row holds them)
    generator: torch.Generator
    streamer: TextStreamer
    stats: GenerationStats
    step_logits: Optional[list[torch.Tensor]] = None  # [V] float32 per token chosen, when asked for; else None
    slot: Optional[int] = None  # the decode-state slot it writes; None: none held
    phase: Phase = Phase.WAITING
    length: int = 0  # tokens in its cache rows
    tokens: list[int] = field(default_factory=list)
    next_logits: Optional[torch.Tensor] = None  # [V] float32, set when the prompt is in
    embeds: Optional[torch.Tensor] = None  # [1, T, D] while PREFILLING
    error: Optional[BaseException] = None  # why it failed (phase FINISHED, finish_reason "error")
    keys: Optional[torch.Tensor] = None  # [T] int64 prompt keys for the prefix cache (None: it is off)
    started: float = field(default_factory=time.perf_counter)
    cancel_requested: threading.Event = field(default_factory=threading.Event)  # set from any thread

    @property
    def finished(self) -> bool:
        """True once it ended (stop rule, cancel or failure)."""
        return self.phase is Phase.FINISHED

    @property
    def last_token(self) -> int:
        return self.tokens[-1]

    def assign(self, slot: int) -> None:
        """Give a WAITING request its slot: it starts PREFILLING."""
        if self.phase is not Phase.WAITING:
            raise RuntimeError(f"only a waiting request takes a slot; this one is {self.phase.value}")
        self.slot, self.phase = slot, Phase.PREFILLING

    def cancel(self) -> None:
        """Ask for it to stop (any thread); whoever runs it ends it at its next turn."""
        self.cancel_requested.set()

    def finish(self, reason: str, error: Optional[BaseException] = None) -> None:
        """End it: phase FINISHED with ``reason`` ("stop", "stop_string", "length", "cancelled",
        "error" with ``error``); the prompt's embeddings are dropped. Its slot is given back by
        whoever holds the decode state."""
        self.phase, self.embeds, self.error = Phase.FINISHED, None, error
        self.stats.finish_reason = reason
        self.stats.total_seconds = time.perf_counter() - self.started

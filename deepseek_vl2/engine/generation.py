"""Generation: chunked prefill into a slot of the persistent decode state, then decode steps.

Interface (predict.py, the scheduler and the benchmark code against it)::

    Generator.load(checkpoint_dir, device=None, dtype=None, prefill_chunk=512, *,
                   compile=None, max_batch=1, max_len=None, config=None, weight_files=None)

* ``compile``: None → the environment variable ``DSVL2_COMPILE`` ("0" eager, "1" compiled) when
  set, else compiled on CUDA and eager on CPU. Compiled = ``torch.compile(fullgraph=True)`` of
  the decode step, replayed as CUDA graphs on CUDA (``engine/decode.py``).
* ``max_batch`` × ``max_len``: the persistent decode state (KV cache and every buffer a decode
  step touches), allocated here, once: ``max_batch`` requests at a time of up to ``max_len``
  tokens each (default: the model's context). A :class:`~.scheduler.BatchScheduler` needing
  more slots grows it once, when it is built.
* ``config`` / ``weight_files``: an already-parsed config and the checkpoint's safetensors
  files, so that setup reads ``config.json`` and the file headers once.

:meth:`Generator.warmup` compiles (and captures) the decode buckets and returns their seconds;
:meth:`Generator.stream` generates one request; :meth:`Generator.generate_ids` and
:meth:`Generator.generate_with_logits` return its ids (and per-step logits).

The pieces are shared by the single-request path and the batching scheduler: a
:class:`Request` is one request's state (slot, length, random generator, text streamer);
:meth:`Generator.prefill_step` fills its slot of the KV cache; :meth:`Generator.sample` picks
the first token from the prefill logits; :meth:`Generator.decode` runs one decode step (any set
of sequences together) and reads the new token ids, the only host read of the step.
:meth:`Generator.decode_logits` is the eager reference path over a caller-owned cache.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch
from PIL import Image

from deepseek_vl2.inputs.processor import DeepseekVL2Processor, ProcessedInputs, build_conversation
from deepseek_vl2.model.checkpoint import load_model
from deepseek_vl2.model.config import DeepseekVL2Config
from deepseek_vl2.model.kv_cache import KVCache
from deepseek_vl2.model.multimodal import DeepseekVL2
from .decode import DecodeEngine
from .sampling import SamplingParams, make_generator, make_seen_mask, sample_next, update_seen
from .streaming import TextStreamer, hidden_special_ids

log = logging.getLogger(__name__)

DEFAULT_PREFILL_CHUNK = 512
KV_LEN_BUCKET = 256
COMPILE_ENV = "DSVL2_COMPILE"


class ContextLengthError(ValueError):
    """The prompt does not fit the model's context window (or the server's per-request cache)."""


def resolve_compile(compile: Optional[bool], device: torch.device) -> bool:
    """Whether to compile the decode step: ``compile`` if given, else $DSVL2_COMPILE, else CUDA only."""
    if compile is not None:
        return bool(compile)
    value = os.environ.get(COMPILE_ENV, "").strip()
    if value not in ("", "0", "1"):
        raise ValueError(f"{COMPILE_ENV} must be 0 (eager) or 1 (compiled), got {value!r}")
    return value == "1" if value else device.type == "cuda"


@dataclass
class GenerationStats:
    """Counts and timings of one generation (filled as it runs)."""

    prompt_tokens: int = 0
    new_tokens: int = 0
    max_new_tokens: int = 0
    seed: Optional[int] = None
    time_to_first_token: float = 0.0
    total_seconds: float = 0.0
    finish_reason: str = ""

    @property
    def tokens_per_second(self) -> float:
        """Decode speed after the first token."""
        decode_time = self.total_seconds - self.time_to_first_token
        return (self.new_tokens - 1) / decode_time if self.new_tokens > 1 and decode_time > 0 else 0.0


@dataclass
class Request:
    """State of one request while it generates."""

    inputs: ProcessedInputs
    params: SamplingParams
    slot: int
    max_new_tokens: int
    seen: torch.Tensor  # [1, V] bool until the first decode step (then the decode state's row holds it)
    generator: torch.Generator
    streamer: TextStreamer
    stats: GenerationStats
    length: int = 0  # tokens in the cache
    tokens: list[int] = field(default_factory=list)
    next_logits: Optional[torch.Tensor] = None  # [V] float32
    embeds: Optional[torch.Tensor] = None  # [1, T, D] while prefilling
    started: float = field(default_factory=time.perf_counter)
    finished: bool = False
    row_started: bool = False  # its row of the decode state is written

    @property
    def last_token(self) -> int:
        return self.tokens[-1]


class Generator:
    """DeepSeek-VL2 model + processor, with chunked prefill, a persistent decode state and streaming."""

    def __init__(self, model: DeepseekVL2, processor: DeepseekVL2Processor, prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
                 *, compile: Optional[bool] = None, max_batch: int = 1, max_len: Optional[int] = None) -> None:
        self.model = model
        self.processor = processor
        self.prefill_chunk = prefill_chunk
        self.last_stats = GenerationStats()
        self.last_tokens: list[int] = []
        self.hidden_token_ids = hidden_special_ids(processor.tokenizer)  # grounding tags stay visible
        self.engine = DecodeEngine(model, max_batch, max_len or self.context_length,
                                   resolve_compile(compile, model.device), KV_LEN_BUCKET)

    @classmethod
    def load(
        cls, checkpoint_dir: str | Path, device=None, dtype: Optional[torch.dtype] = None,
        prefill_chunk: int = DEFAULT_PREFILL_CHUNK, *, compile: Optional[bool] = None, max_batch: int = 1,
        max_len: Optional[int] = None, config: Optional[DeepseekVL2Config] = None,
        weight_files: Optional[Sequence[Path]] = None, quantize: str = "none",
    ) -> "Generator":
        """Load model and processor from an official checkpoint directory (arguments: module docstring;
        ``quantize``: "none", or "int8"/"fp8" expert weights)."""
        model = load_model(checkpoint_dir, device=device, dtype=dtype, config=config, files=weight_files,
                           quantize=quantize)
        processor = DeepseekVL2Processor.from_pretrained(checkpoint_dir)
        return cls(model, processor, prefill_chunk, compile=compile, max_batch=max_batch, max_len=max_len)

    @property
    def variant(self) -> str:
        """Name of the official variant the model's shapes match, or "custom"."""
        return self.model.config.variant

    @property
    def context_length(self) -> int:
        return self.model.config.language.max_position_embeddings

    @property
    def token_limit(self) -> int:
        """Most tokens (prompt + answer) one request may hold: the context or the decode state's length."""
        return min(self.context_length, self.engine.max_len)

    @property
    def eos_id(self) -> int:
        return self.processor.eos_id

    @property
    def kv_bucket(self) -> int:
        """Decode steps attend over the cache rounded up to a multiple of this (shared shapes)."""
        return self.engine.kv_bucket

    @kv_bucket.setter
    def kv_bucket(self, value: int) -> None:
        self.engine.kv_bucket = value

    def reserve(self, max_batch: int, max_len: int) -> None:
        """Grow the persistent decode state to at least ``max_batch`` slots of ``max_len`` tokens (setup time)."""
        self.engine.reserve(max_batch, max_len)

    def warmup(self, rows: Optional[Sequence[int]] = None, kv_lens: Optional[Sequence[int]] = None,
               modes: Sequence[str] = ("greedy", "full"), max_seconds: Optional[float] = None) -> dict[str, float]:
        """Compile (and on CUDA capture) the decode step's buckets; seconds per bucket (see DecodeEngine.warmup)."""
        return self.engine.warmup(rows, kv_lens, modes, max_seconds)

    # ----------------------------------------------------------------------------- inputs
    def prepare(self, prompt: str, images: Sequence[Image.Image], system_prompt: str = "") -> ProcessedInputs:
        """Process a single-turn prompt (``<image>`` tags optional) and its images.

        Role markers and bos/eos/pad strings in the prompt are plain text; ``<image>`` and the
        grounding tags are structure (README.md). Raises ContextLengthError, with the
        token counts, when the prompt leaves no room for an answer.
        """
        conversation = build_conversation(prompt, len(images), self.processor.image_token)
        inputs = self.processor.process(conversation, list(images), system_prompt, system_prompt_in_tokens=True,
                                        user_text_specials="structural")
        self.budget(int(inputs.input_ids.numel()), 1, inputs=inputs)
        return inputs

    def budget(self, prompt_tokens: int, max_new_tokens: int, *, limit: Optional[int] = None,
               inputs: Optional[ProcessedInputs] = None) -> int:
        """New tokens that fit after the prompt — the one context-fit rule of the project.

        The request may hold ``min(context, decode state length, limit)`` tokens. Raises
        ContextLengthError (with the token counts; per image when ``inputs`` are given) when the
        prompt alone leaves no room for one new token.
        """
        holds = self._holds(limit)
        room = holds - prompt_tokens
        if room >= 1:
            return min(max_new_tokens, room)
        where = "the model's context" if holds == self.context_length else "this server's cache for one request"
        parts = self.processor.token_parts(inputs) if inputs is not None else "text and image tiles"
        raise ContextLengthError(
            f"the prompt needs {prompt_tokens} tokens ({parts}) but {where} holds {holds}, leaving no room for an "
            f"answer. {self.processor.image_token_advice()} Use fewer or smaller images, or a shorter prompt."
        )

    def _holds(self, limit: Optional[int]) -> int:
        return self.token_limit if limit is None else min(limit, self.token_limit)

    # ----------------------------------------------------------------------------- steps
    def new_sequence(self, inputs: ProcessedInputs, params: SamplingParams, slot: int = 0,
                     limit: Optional[int] = None) -> Request:
        """Validate and set up a request's state (no model work yet; ``slot`` -1: not assigned yet)."""
        params.validate()
        prompt_tokens = int(inputs.input_ids.numel())
        max_new = self.budget(prompt_tokens, params.max_new_tokens, limit=limit, inputs=inputs)
        if max_new < params.max_new_tokens:
            log.info("max_length_tokens lowered from %d to %d to fit the %d-token context",
                     params.max_new_tokens, max_new, self._holds(limit))
        device = self.model.device
        vocab = self.model.config.language.vocab_size
        generator, seed = make_generator(params.seed, device)
        stats = GenerationStats(prompt_tokens=prompt_tokens, max_new_tokens=max_new, seed=seed)
        streamer = TextStreamer(self.processor.tokenizer, self.hidden_token_ids, params.stop)
        seen = make_seen_mask([inputs.input_ids], vocab, device)
        return Request(inputs, params, slot, max_new, seen, generator, streamer, stats)

    @torch.inference_mode()
    def prefill_step(self, seq: Request, cache: Optional[KVCache] = None, chunk: Optional[int] = None) -> bool:
        """Write the next chunk of the prompt into ``seq``'s cache slot; True once the prompt is in.

        ``cache`` defaults to the persistent decode state's. The first call embeds the prompt
        (vision tower over all tiles in one batch); the last sets ``seq.next_logits``.
        """
        chunk = chunk or self.prefill_chunk
        cache = cache if cache is not None else self.engine.state.cache
        if seq.slot < 0:
            raise RuntimeError("the sequence holds no slot: acquire one first")
        if seq.embeds is None:
            inputs = seq.inputs
            seq.embeds = self.model.embed_inputs(
                inputs.input_ids, inputs.images, inputs.images_seq_mask, inputs.images_spatial_crop
            ).unsqueeze(0)
        start, total = seq.length, seq.embeds.shape[1]
        end = min(start + chunk, total)
        positions = torch.arange(start, end, device=self.model.device).unsqueeze(0)
        slots = slice(seq.slot, seq.slot + 1)  # one slot: the cache is read as a view
        logits = self.model.forward_embeds(seq.embeds[:, start:end], positions, cache, slots, kv_len=end, last_only=True)
        seq.length = end
        if end < total:
            return False
        seq.next_logits, seq.embeds = logits[0, -1], None
        return True

    def prefill(self, seq: Request, cache: Optional[KVCache] = None, chunk: Optional[int] = None) -> None:
        """Write the whole prompt into ``seq``'s cache slot, chunk by chunk; sets ``seq.next_logits``."""
        while not self.prefill_step(seq, cache, chunk):
            pass

    def decode(self, seqs: Sequence[Request]) -> list[str]:
        """One decode step for ``seqs`` (each holding a slot, its prompt prefilled and a first token
        sampled): the new tokens are chosen on the device; returns the text each may emit now."""
        tokens, _ = self.decode_step(seqs)
        ids = tokens.tolist()  # the step's one host read
        return self._accept(seqs, [ids[s.slot] for s in seqs])

    def decode_step(self, seqs: Sequence[Request]) -> tuple[torch.Tensor, torch.Tensor]:
        """One decode step on the device (no host read): new tokens [rows] and logits [rows, V], indexed by slot."""
        for s in seqs:
            if not s.row_started:
                self.engine.start_row(s.slot, s.last_token, s.length, s.seen, s.params)
                s.row_started = True
        tokens, logits = self.engine.step([s.slot for s in seqs], [s.length for s in seqs],
                                          [s.params for s in seqs], [s.generator for s in seqs])
        for s in seqs:
            s.length += 1
        return tokens, logits

    @torch.inference_mode()
    def decode_logits(self, seqs: Sequence[Request], cache: KVCache) -> torch.Tensor:
        """Eager reference path over a caller-owned ``cache``: feed each sequence's last token at its
        next position and return the logits [B, V] (choose the tokens with :meth:`sample`)."""
        device = self.model.device
        tokens = torch.tensor([[s.last_token] for s in seqs], device=device)
        positions = torch.tensor([[s.length] for s in seqs], device=device)
        slots = torch.tensor([s.slot for s in seqs], device=device)
        needed = max(s.length for s in seqs) + 1
        kv_len = min(cache.max_len, -(-needed // self.kv_bucket) * self.kv_bucket)
        logits = self.model.forward_tokens(tokens, positions, cache, slots, kv_len)[:, -1]
        for s in seqs:
            s.length += 1
        return logits

    def sample(self, seqs: Sequence[Request], logits: torch.Tensor) -> list[str]:
        """Choose each sequence's next token from logits [B, V] (the first token, after prefill);
        returns the text each may emit now."""
        seen = torch.cat([s.seen for s in seqs])
        tokens = sample_next(logits, seen, [s.params for s in seqs], [s.generator for s in seqs])
        for row, s in enumerate(seqs):
            update_seen(s.seen, tokens[row : row + 1])  # stays on the device
        return self._accept(seqs, tokens.tolist())

    def _accept(self, seqs: Sequence[Request], tokens: list[int]) -> list[str]:
        """Record one new token per sequence, stream its text and apply the stop rules."""
        pieces = []
        for s, token in zip(seqs, tokens):
            s.tokens.append(token)
            s.stats.new_tokens += 1
            if s.stats.new_tokens == 1:
                s.stats.time_to_first_token = time.perf_counter() - s.started
            piece = s.streamer.push(token)
            if token == self.eos_id and not s.params.ignore_eos:
                s.finished, s.stats.finish_reason = True, "stop"
            elif s.streamer.stopped:
                s.finished, s.stats.finish_reason = True, "stop_string"
            elif s.stats.new_tokens >= s.max_new_tokens:
                s.finished, s.stats.finish_reason = True, "length"
            if s.finished:
                piece += s.streamer.finish()
                s.stats.total_seconds = time.perf_counter() - s.started
            pieces.append(piece)
        return pieces

    # ----------------------------------------------------------------------------- one request
    def stream(self, inputs: ProcessedInputs, params: SamplingParams) -> Iterator[str]:
        """Generate for one request, yielding text pieces as tokens arrive (stats in ``last_stats``)."""
        for piece, _ in self._generate(inputs, params, keep_logits=False):
            if piece:
                yield piece

    def _generate(self, inputs: ProcessedInputs, params: SamplingParams,
                  keep_logits: bool) -> Iterator[tuple[str, Optional[torch.Tensor]]]:
        """(text piece, the logits the token was chosen from when ``keep_logits``) per new token."""
        seq = self.new_sequence(inputs, params)
        self.last_stats, self.last_tokens = seq.stats, seq.tokens
        seq.slot = self.engine.acquire()
        try:
            self.prefill(seq)
            logits = seq.next_logits
            piece = self.sample([seq], logits.unsqueeze(0))[0]
            while True:
                yield piece, (logits.clone() if keep_logits else None)
                if seq.finished:
                    return
                tokens, all_logits = self.decode_step([seq])
                logits = all_logits[seq.slot]
                piece = self._accept([seq], [tokens.tolist()[seq.slot]])[0]
        finally:
            self.engine.release(seq.slot)
            seq.slot = -1

    def generate_ids(self, inputs: ProcessedInputs, params: SamplingParams) -> list[int]:
        """All generated token ids (eos included when it was produced)."""
        for _ in self.stream(inputs, params):
            pass
        return list(self.last_tokens)

    def generate_with_logits(self, inputs: ProcessedInputs, params: SamplingParams) -> tuple[list[int], torch.Tensor]:
        """Generated ids and the raw logits [n, V] (float32) each was chosen from (HF ``output_logits``)."""
        logits = [step for _, step in self._generate(inputs, params, keep_logits=True)]
        return list(self.last_tokens), torch.stack(logits)

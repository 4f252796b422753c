"""Generation: chunked prefill into a slot of the KV cache, then a cached decode loop.

The pieces are shared by the single-request path (:meth:`Generator.stream`) and the batching
scheduler (``scheduler.py``): a :class:`Sequence` is one request's state (its slot, length,
seen-token mask, random generator and text streamer); :meth:`Generator.prefill` fills its slot;
:meth:`Generator.decode_logits` runs one batched decode step for any set of sequences.

One decode step is: embed the last tokens [B, 1] → every layer (attention over the slot's cache
up to a host-known kv_len, MoE with gathered expert weights) → logits [B, V] → sampling on the
device. Nothing inside the step reads a tensor value on the host; the only synchronisation per
step is reading the sampled ids once, to stream their text.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence as Seq

import torch
from PIL import Image

from deepseek_vl2.model.checkpoint import load_model
from deepseek_vl2.model.kv_cache import KVCache
from deepseek_vl2.model.multimodal import DeepseekVL2
from deepseek_vl2.inputs.processor import DeepseekVL2Processor, ProcessedInputs, build_conversation
from .sampling import SamplingParams, make_generator, make_seen_mask, sample_next, update_seen
from .streaming import TextStreamer, hidden_special_ids

log = logging.getLogger(__name__)

DEFAULT_PREFILL_CHUNK = 512
KV_LEN_BUCKET = 256


class ContextLengthError(ValueError):
    """The prompt does not fit the model's context window."""


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
class Sequence:
    """State of one request while it generates."""

    inputs: ProcessedInputs
    params: SamplingParams
    slot: int
    max_new_tokens: int
    seen: torch.Tensor  # [1, V] bool
    generator: torch.Generator
    streamer: TextStreamer
    stats: GenerationStats
    length: int = 0  # tokens in the cache
    tokens: list[int] = field(default_factory=list)
    next_logits: Optional[torch.Tensor] = None  # [V] float32
    embeds: Optional[torch.Tensor] = None  # [1, T, D] while prefilling
    started: float = field(default_factory=time.perf_counter)
    finished: bool = False

    @property
    def last_token(self) -> int:
        return self.tokens[-1]


class Generator:
    """DeepSeek-VL2 model + processor, with chunked prefill, cached decode and streaming."""

    def __init__(self, model: DeepseekVL2, processor: DeepseekVL2Processor, prefill_chunk: int = DEFAULT_PREFILL_CHUNK):
        self.model = model
        self.processor = processor
        self.prefill_chunk = prefill_chunk
        self.kv_bucket = KV_LEN_BUCKET
        self.last_stats = GenerationStats()
        self.last_tokens: list[int] = []
        self.hidden_token_ids = hidden_special_ids(processor.tokenizer)  # grounding tags stay visible

    @classmethod
    def load(
        cls, checkpoint_dir: str | Path, device=None, dtype: Optional[torch.dtype] = None, prefill_chunk: int = DEFAULT_PREFILL_CHUNK
    ) -> "Generator":
        """Load model and processor from an official checkpoint directory."""
        model = load_model(checkpoint_dir, device=device, dtype=dtype)
        processor = DeepseekVL2Processor.from_pretrained(checkpoint_dir)
        return cls(model, processor, prefill_chunk)

    @property
    def variant(self) -> str:
        return self.model.config.variant

    @property
    def context_length(self) -> int:
        return self.model.config.language.max_position_embeddings

    @property
    def eos_id(self) -> int:
        return self.processor.eos_id

    # ----------------------------------------------------------------------------- inputs
    def prepare(self, prompt: str, images: Seq[Image.Image], system_prompt: str = "") -> ProcessedInputs:
        """Process a single-turn prompt (``<image>`` tags optional) and its images.

        Role markers and bos/eos/pad strings in the prompt are plain text; ``<image>`` and the
        grounding tags are structure (README.md). Raises ContextLengthError, with the
        token counts, when the prompt leaves no room for an answer.
        """
        conversation = build_conversation(prompt, len(images), self.processor.image_token)
        inputs = self.processor.process(conversation, list(images), system_prompt, system_prompt_in_tokens=True,
                                        user_text_specials="structural")
        overflow = self.processor.context_overflow(inputs, self.context_length)
        if overflow:
            raise ContextLengthError(overflow)
        return inputs

    def budget(self, prompt_tokens: int, max_new_tokens: int) -> int:
        """New tokens that fit after the prompt; raises ContextLengthError when the prompt alone does not fit."""
        room = self.context_length - prompt_tokens
        if room < 1:
            raise ContextLengthError(
                f"the prompt needs {prompt_tokens} tokens (text and image tiles) but the model's context holds "
                f"{self.context_length}, leaving no room for an answer: use fewer or smaller images, or a shorter prompt"
            )
        return min(max_new_tokens, room)

    # ----------------------------------------------------------------------------- steps
    def new_sequence(self, inputs: ProcessedInputs, params: SamplingParams, slot: int = 0) -> Sequence:
        """Validate and set up a request's state (no model work yet)."""
        params.validate()
        prompt_tokens = int(inputs.input_ids.numel())
        max_new = self.budget(prompt_tokens, params.max_new_tokens)
        if max_new < params.max_new_tokens:
            log.info("max_length_tokens lowered from %d to %d to fit the %d-token context",
                     params.max_new_tokens, max_new, self.context_length)
        device = self.model.device
        vocab = self.model.config.language.vocab_size
        generator, seed = make_generator(params.seed, device)
        stats = GenerationStats(prompt_tokens=prompt_tokens, max_new_tokens=max_new, seed=seed)
        streamer = TextStreamer(self.processor.tokenizer, self.hidden_token_ids, params.stop)
        seen = make_seen_mask([inputs.input_ids], vocab, device)
        return Sequence(inputs, params, slot, max_new, seen, generator, streamer, stats)

    @torch.inference_mode()
    def prefill_step(self, seq: Sequence, cache: KVCache, chunk: Optional[int] = None) -> bool:
        """Write the next chunk of the prompt into ``seq``'s cache slot; True once the prompt is in.

        The first call embeds the prompt (vision tower over all tiles); the last sets ``seq.next_logits``.
        """
        chunk = chunk or self.prefill_chunk
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

    def prefill(self, seq: Sequence, cache: KVCache, chunk: Optional[int] = None) -> None:
        """Write the whole prompt into ``seq``'s cache slot, chunk by chunk; sets ``seq.next_logits``."""
        while not self.prefill_step(seq, cache, chunk):
            pass

    @torch.inference_mode()
    def decode_logits(self, seqs: Seq[Sequence], cache: KVCache) -> torch.Tensor:
        """Feed each sequence's last token at its next position; returns logits [B, V]."""
        device = self.model.device
        tokens = torch.tensor([[s.last_token] for s in seqs], device=device)
        positions = torch.tensor([[s.length] for s in seqs], device=device)
        slot_ids = [s.slot for s in seqs]
        if slot_ids == list(range(slot_ids[0], slot_ids[0] + len(slot_ids))):
            slots = slice(slot_ids[0], slot_ids[0] + len(slot_ids))  # consecutive: read the cache as a view
        else:
            slots = torch.tensor(slot_ids, device=device)
        # Round the attended length up to a bucket (masked beyond each request's own position), so
        # consecutive steps share tensor shapes: what torch.compile / CUDA-graph capture need.
        needed = max(s.length for s in seqs) + 1
        kv_len = min(cache.max_len, -(-needed // self.kv_bucket) * self.kv_bucket)
        logits = self.model.forward_tokens(tokens, positions, cache, slots, kv_len)[:, -1]
        for s in seqs:
            s.length += 1
        return logits

    def sample(self, seqs: Seq[Sequence], logits: torch.Tensor) -> list[str]:
        """Choose each sequence's next token from logits [B, V]; returns the text each may emit now."""
        seen = torch.cat([s.seen for s in seqs])
        tokens = sample_next(logits, seen, [s.params for s in seqs], [s.generator for s in seqs])
        pieces = []
        for row, (s, token) in enumerate(zip(seqs, tokens.tolist())):
            update_seen(s.seen, tokens[row : row + 1])  # stays on the device
            s.tokens.append(token)
            s.stats.new_tokens += 1
            if s.stats.new_tokens == 1:
                s.stats.time_to_first_token = time.perf_counter() - s.started
            piece = s.streamer.push(token)
            if token == self.eos_id:
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
        seq = self.new_sequence(inputs, params)
        self.last_stats, self.last_tokens = seq.stats, seq.tokens
        cache = self.model.new_cache(1, seq.stats.prompt_tokens + seq.max_new_tokens)
        self.prefill(seq, cache)
        logits = seq.next_logits.unsqueeze(0)
        while True:
            piece = self.sample([seq], logits)[0]
            if piece:
                yield piece
            if seq.finished:
                return
            logits = self.decode_logits([seq], cache)

    def generate_ids(self, inputs: ProcessedInputs, params: SamplingParams) -> list[int]:
        """All generated token ids (eos included when it was produced)."""
        for _ in self.stream(inputs, params):
            pass
        return list(self.last_tokens)

    def generate(self, inputs: ProcessedInputs, params: SamplingParams) -> str:
        """The whole answer as one string."""
        return "".join(self.stream(inputs, params))

"""Generation: chunked prefill into a slot of the persistent decode state, then decode steps.

Interface (predict.py, the scheduler and the benchmark code against it)::

    Generator.load(checkpoint_dir, device=None, dtype=None, prefill_chunk=512, *,
                   compile=None, max_batch=1, max_len=None, kv_bucket=256, config=None, weight_files=None)

The settings come from the caller (a server reads them once into an
:class:`~.config.EngineConfig`); nothing here reads the environment.

* ``compile``: True/False, or None: compiled on CUDA and eager on CPU. Compiled =
  ``torch.compile(fullgraph=True)`` of the decode step region by region, replayed as CUDA graphs on CUDA
  (``engine/decode.py``).
* ``max_batch`` × ``max_len``: the persistent decode state (KV cache and every buffer a decode
  step touches), allocated here, once: ``max_batch`` requests at a time of up to ``max_len``
  tokens each (default: the model's context). A :class:`~.scheduler.BatchScheduler` needing
  more slots grows it once, when it is built.
* ``kv_bucket``: decode steps attend over the cache rounded up to a multiple of this.
* ``config`` / ``weight_files``: an already-parsed config and the checkpoint's safetensors
  files, so that setup reads ``config.json`` and the file headers once.

:meth:`Generator.warmup` compiles (and captures) the decode buckets and returns their seconds.

A Generator holds the steps of a request; the :class:`~.scheduler.BatchScheduler` is the one
thing that runs them (every request, single or batched, goes through it; docs/engine.md). A
:class:`~.request.Request` is one request's state (phase, slot, length, random generator, text
streamer); :meth:`Generator.admit` / :meth:`Generator.release` hand it a decode-state slot and
take it back; :meth:`Generator.prefill_step` fills its slot of the KV cache;
:meth:`Generator.sample` picks the first token from the prefill logits;
:meth:`Generator.next_tokens` runs one decode step (any set of requests together) and reads the
new token ids, the only host read of the step; :meth:`Generator.accept` records one token. A
request made with ``record_logits`` keeps the logits each of its tokens was chosen from.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Optional, Sequence

import torch
from PIL import Image

from deepseek_vl2.inputs.processor import DeepseekVL2Processor, ProcessedInputs, build_conversation
from deepseek_vl2.model.checkpoint import load_model
from deepseek_vl2.model.config import DeepseekVL2Config
from deepseek_vl2.model.multimodal import DeepseekVL2
from .config import DEFAULT_KV_BUCKET, DEFAULT_PREFILL_CHUNK, resolve_compile
from .decode import DecodeEngine
from .prefix_cache import PrefixCache, sequence_keys
from .request import GenerationStats, Phase, Request
from .sampling import SamplingParams, draw_uniforms, make_generator, make_seen_mask, sample_next, update_seen
from .streaming import TextStreamer, hidden_special_ids

if TYPE_CHECKING:
    from .scheduler import BatchScheduler

log = logging.getLogger(__name__)

class ContextLengthError(ValueError):
    """The prompt does not fit the model's context window (or the server's per-request cache)."""


class Generator:
    """DeepSeek-VL2 model + processor, with chunked prefill, a persistent decode state and streaming."""

    def __init__(self, model: DeepseekVL2, processor: DeepseekVL2Processor, prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
                 *, compile: Optional[bool] = None, max_batch: int = 1, max_len: Optional[int] = None,
                 kv_bucket: int = DEFAULT_KV_BUCKET, prefix_cache: bool = True) -> None:
        self.model = model
        self.processor = processor
        self.prefill_chunk = prefill_chunk
        # the one scheduler running this generator's requests (it alone hands out the decode state's slots)
        self.scheduler: Optional["BatchScheduler"] = None
        self.hidden_token_ids = hidden_special_ids(processor.tokenizer)  # grounding tags stay visible
        self.engine = DecodeEngine(model, max_batch, max_len or self.context_length,
                                   resolve_compile(compile, model.device.type), kv_bucket)
        # finished requests' slots stay parked with their tokens; a request starting with them reuses the KV
        self.prefix_cache = PrefixCache(prefix_cache)

    @classmethod
    def load(
        cls, checkpoint_dir: str | Path, device=None, dtype: Optional[torch.dtype] = None,
        prefill_chunk: int = DEFAULT_PREFILL_CHUNK, *, compile: Optional[bool] = None, max_batch: int = 1,
        max_len: Optional[int] = None, kv_bucket: int = DEFAULT_KV_BUCKET, config: Optional[DeepseekVL2Config] = None,
        weight_files: Optional[Sequence[Path]] = None, quantize: str = "none", prefix_cache: bool = True,
    ) -> "Generator":
        """Load model and processor from an official checkpoint directory (arguments: module docstring;
        ``quantize``: "none", or "int8"/"fp8" expert weights)."""
        model = load_model(checkpoint_dir, device=device, dtype=dtype, config=config, files=weight_files,
                           quantize=quantize)
        processor = DeepseekVL2Processor.from_pretrained(checkpoint_dir)
        return cls(model, processor, prefill_chunk, compile=compile, max_batch=max_batch, max_len=max_len,
                   kv_bucket=kv_bucket, prefix_cache=prefix_cache)

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
        state = self.engine.state
        self.engine.reserve(max_batch, max_len)
        if self.engine.state is not state:  # a new state: the parked KV is gone
            self.prefix_cache.clear()

    def warmup(self, max_seconds: Optional[float] = None) -> dict[str, float]:
        """Compile (and on CUDA capture) the decode step; seconds per piece (see DecodeEngine.warmup)."""
        return self.engine.warmup(max_seconds)

    # ----------------------------------------------------------------------------- inputs
    def prepare(self, prompt: str, images: Sequence[Image.Image], system_prompt: str = "",
                history: Sequence[Mapping[str, str]] = ()) -> ProcessedInputs:
        """Process a prompt (``<image>`` tags optional) after the earlier turns ``history``, and the images.

        Role markers and bos/eos/pad strings in the prompt are plain text; ``<image>`` and the
        grounding tags are structure (README.md). Raises ContextLengthError, with the
        token counts, when the prompt leaves no room for an answer.
        """
        conversation = build_conversation(prompt, len(images), self.processor.image_token, history)
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
        turns = " or fewer earlier turns" if inputs is not None and inputs.earlier_text_tokens else ""
        raise ContextLengthError(
            f"the prompt needs {prompt_tokens} tokens ({parts}) but {where} holds {holds}, leaving no room for an "
            f"answer: {prompt_tokens - holds + 1} tokens too many. {self.processor.image_token_advice()} "
            f"Use fewer or smaller images, or a shorter prompt{turns}."
        )

    def _holds(self, limit: Optional[int]) -> int:
        return self.token_limit if limit is None else min(limit, self.token_limit)

    # ----------------------------------------------------------------------------- steps
    def new_request(self, inputs: ProcessedInputs, params: SamplingParams, limit: Optional[int] = None, *,
                    record_logits: bool = False) -> Request:
        """Set up a WAITING request's state (no model work yet; :meth:`admit` gives it a slot).

        ``record_logits``: keep the logits [V] each token is chosen from (``Request.step_logits``).
        Raises ContextLengthError when the prompt cannot fit ``limit``.
        """
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
        keys = sequence_keys(inputs) if self.prefix_cache.enabled else None
        return Request(inputs, params, max_new, seen, generator, streamer, stats,
                       step_logits=[] if record_logits else None, keys=keys)

    def admit(self, request: Request) -> None:
        """Give a WAITING request a free decode-state slot: the parked one holding the longest prefix
        of its prompt (that KV is reused: ``length`` and ``stats.cached_tokens``), else a fresh one
        (engine/prefix_cache.py). Raises SlotsExhaustedError."""
        free = self.engine.free_slots
        match = self.prefix_cache.choose(request.keys, free) if free else None
        request.assign(self.engine.acquire(match.slot if match else None))  # none free: SlotsExhaustedError
        request.length = request.stats.cached_tokens = match.reused

    def release(self, request: Request) -> None:
        """Give the request's decode-state slot back, if it holds one (its row goes idle); the slot
        stays parked with the tokens whose KV it really holds (after a failure: none, and the slot is zeroed)."""
        if request.slot is not None:
            slot, request.slot = request.slot, None
            self.engine.release(slot)
            if request.error is not None:  # it may have written NaN/inf entries: nothing of it is kept
                self.engine.state.cache.clear(slot)
            elif request.keys is not None:
                written = torch.cat([request.keys, torch.tensor(request.tokens, dtype=torch.long)])[: request.length]
                self.prefix_cache.park(slot, written)

    @torch.inference_mode()
    def prefill_step(self, request: Request) -> bool:
        """Write the next ``prefill_chunk`` tokens of the prompt into ``request``'s slot of the decode
        state's KV cache; True once the prompt is in.

        The first call embeds the prompt from ``request.length`` on (the KV before it is reused: the
        vision tower runs, over all their tiles in one batch, on the images with a position there);
        the last sets ``request.next_logits`` and the phase SAMPLING.
        """
        if request.phase is not Phase.PREFILLING or request.slot is None:
            raise RuntimeError(f"only a request holding a slot prefills; this one is {request.phase.value}")
        chunk, cache = self.prefill_chunk, self.engine.state.cache
        total = request.stats.prompt_tokens
        if request.embeds is None:
            request.embeds = self._embed_from(request.inputs, request.length).unsqueeze(0)
        start = request.length
        end = min(start + chunk, total)
        offset = total - request.embeds.shape[1]  # the embeddings begin at this position
        positions = torch.arange(start, end, device=self.model.device).unsqueeze(0)
        slots = slice(request.slot, request.slot + 1)  # one slot: the cache is read as a view
        logits = self.model.forward_embeds(request.embeds[:, start - offset : end - offset], positions, cache, slots,
                                           kv_len=end, last_only=True)
        request.length = end
        if end < total:
            return False
        request.next_logits, request.embeds, request.phase = logits[0, -1], None, Phase.SAMPLING
        return True

    def _embed_from(self, inputs: ProcessedInputs, start: int) -> torch.Tensor:
        """Embeddings [T - start, D] of the prompt's positions from ``start`` on; the vision tower runs
        only on the images with a position there (a partly reused image is embedded whole, then cut)."""
        mask = inputs.images_seq_mask.reshape(-1).cpu()
        image_ends = torch.nonzero(mask).reshape(-1).split(list(inputs.num_image_tokens)) if mask.any() else ()
        tiles = [1 + a * d for a, d in inputs.images_spatial_crop.tolist() if a > 0 and d > 0]
        first = next((i for i, span in enumerate(image_ends) if int(span[-1]) >= start), len(image_ends))
        if first == len(image_ends):  # only text from ``start`` on
            return self.model.embed_inputs(inputs.input_ids.reshape(-1)[start:])
        begin = min(start, int(image_ends[first][0]))
        embeds = self.model.embed_inputs(inputs.input_ids.reshape(-1)[begin:], inputs.images[sum(tiles[:first]):],
                                         mask[begin:], inputs.images_spatial_crop[first:])
        return embeds[start - begin :]

    def next_tokens(self, requests: Sequence[Request]) -> list[int]:
        """One decode step for ``requests`` (each holding a slot, its first token chosen): the new token
        of each, read in the step's one host read. Record them with :meth:`accept`.

        The step writes every row it covers in place and draws from each request's generator,
        so after an exception here the requests' device rows may be a step ahead of them: a
        caller fails them rather than stepping them again.
        """
        tokens, logits = self.decode_step(requests)
        ids = tokens.tolist()  # the step's one host read
        for s in requests:
            if s.step_logits is not None:  # a copy: on CUDA the next step overwrites the graph's outputs
                s.step_logits.append(logits[s.slot].float().clone())
        return [ids[s.slot] for s in requests]

    def decode_step(self, requests: Sequence[Request]) -> tuple[torch.Tensor, torch.Tensor]:
        """One decode step on the device (no host read): new tokens [rows] and logits [rows, V], indexed by slot.

        A SAMPLING request's decode-state row is written first (it becomes DECODING)."""
        for s in requests:
            if s.phase is Phase.SAMPLING:
                self.engine.start_row(s.slot, s.last_token, s.length, s.seen, s.params)
                s.phase = Phase.DECODING
            elif s.phase is not Phase.DECODING:
                raise RuntimeError(f"only a request with its first token decodes; this one is {s.phase.value}")
        tokens, logits = self.engine.step([s.slot for s in requests], [s.length for s in requests],
                                          [s.params for s in requests], [s.generator for s in requests])
        for s in requests:
            s.length += 1
        return tokens, logits

    def rewind(self, request: Request) -> None:
        """Put a request that was in a failed decode step back to what it has recorded.

        The step may have written its decode-state row (token, position, seen ids) and drawn
        from its generator before failing. Rebuilt from its own record — prompt, accepted tokens,
        seed — its length, seen ids and generator return to their state before that step (the
        generator is reseeded and advanced by one draw per sampled token), and it goes back to
        SAMPLING so its next step rewrites its row. Stepping it again then gives exactly the
        token the failed step would have given; the cache position the failed step may have
        written is written again with the same values.
        """
        if request.phase not in (Phase.SAMPLING, Phase.DECODING):
            raise RuntimeError(f"only a decoding request rewinds; this one is {request.phase.value}")
        device = self.model.device
        request.length = request.stats.prompt_tokens + len(request.tokens) - 1  # the last token is not in the cache yet
        ids = torch.cat([request.inputs.input_ids.reshape(-1).cpu(), torch.tensor(request.tokens, dtype=torch.long)])
        request.seen = make_seen_mask([ids], self.model.config.language.vocab_size, device)
        if not request.params.is_greedy:  # one uniform per sampled token
            request.generator.manual_seed(request.stats.seed)
            scratch = torch.empty(1, 1, dtype=torch.float64, device=request.generator.device)
            for _ in request.tokens:
                draw_uniforms([request.generator], [True], scratch)
        request.phase = Phase.SAMPLING

    def sample(self, requests: Sequence[Request], logits: torch.Tensor) -> list[str]:
        """Choose each SAMPLING request's next token from logits [B, V] (the first token, after
        prefill); returns the text each may emit now."""
        seen = torch.cat([s.seen for s in requests])
        tokens = sample_next(logits, seen, [s.params for s in requests], [s.generator for s in requests])
        for row, s in enumerate(requests):
            update_seen(s.seen, tokens[row : row + 1])  # stays on the device
            if s.step_logits is not None:
                s.step_logits.append(logits[row].float().clone())
        return [self.accept(s, token) for s, token in zip(requests, tokens.tolist())]

    def accept(self, request: Request, token: int) -> str:
        """Record one new token of ``request``, stream its text and apply the stop rules; the text it may emit now."""
        request.tokens.append(token)
        request.stats.new_tokens += 1
        if request.stats.new_tokens == 1:
            request.stats.time_to_first_token = time.perf_counter() - request.started
        piece = request.streamer.push(token)
        if token == self.eos_id and not request.params.ignore_eos:
            reason = "stop"
        elif request.streamer.stopped:
            reason = "stop_string"
        elif request.stats.new_tokens >= request.max_new_tokens:
            reason = "length"
        else:
            return piece
        piece += request.streamer.finish()
        request.finish(reason)
        return piece

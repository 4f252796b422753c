"""Cog predictor for DeepSeek-VL2: one or more images and a prompt in, streamed text out.

A thin wrapper over the `deepseek_vl2` package: it finds (or downloads) the checkpoint, checks the
GPU has room for it, loads `Generator` once, and per prediction checks the inputs, decodes the
images, builds the prompt and streams the generated text, recording token metrics.
User-facing description: docs/cog.md.
"""

import asyncio
import gc
import math
import os
import re
import time
import traceback
from dataclasses import dataclass
from pathlib import Path as LocalPath
from typing import Any, Optional

import torch
from PIL import Image

import cog
from cog import AsyncConcatenateIterator, BasePredictor, ConcatenateIterator, FieldInfo, Input, Path
from deepseek_vl2.model.checkpoint import default_device, default_dtype, weight_files
from deepseek_vl2.model.config import load_config
from deepseek_vl2.engine.generation import Generator
from deepseek_vl2.inputs.images import load_image
from deepseek_vl2.engine.sampling import SamplingParams, resolve_seed
from deepseek_vl2.engine.scheduler import BatchScheduler
from deepseek_vl2.weights import (
    DEFAULT_VARIANT,
    VARIANT_ENV,
    VARIANTS,
    download,
    missing_checkpoint_files,
    resolve_variant,
    variant_for_repo,
)

REPO_ROOT = LocalPath(__file__).resolve().parent
DEFAULT_WEIGHTS_DIR = REPO_ROOT / "weights"

IMAGE_TAG = "<image>"
IMAGE_INPUTS = ("image", "image_2", "image_3", "image_4")  # order of the images in the prompt

# Input ranges checked by validate_inputs; the Input() declarations repeat them as literals.
TEMPERATURE_RANGE = (0.0, 2.0)
TOP_P_RANGE = (0.01, 1.0)  # (0, 1] really; Cog's Input has no exclusive bound
TOP_K_RANGE = (0, 1000)
REPETITION_PENALTY_RANGE = (1.0, 2.0)  # below 1 would reward repetition
MAX_LENGTH_TOKENS_RANGE = (1, 4096)  # the model's context is 4096 tokens, prompt included
SEED_RANGE = (0, 2**32 - 1)
MAX_STOP_SEQUENCES = 16
# A resource guard only: 4096 tokens of any text are far fewer characters than this.
MAX_TEXT_CHARS = 100_000

# Input descriptions. `cog build` reads predict() statically (tree-sitter), so every Input()
# argument must be a plain literal, or a module-level name bound to one: numbers for ge/le (the
# ranges above, written out again; tests check they agree) and single-line string literals
# without escapes or implicit concatenation for descriptions.
PROMPT_DESCRIPTION = "Question or instruction. <image> marks where each image goes (image, image_2, ... in order); without it the images come before the text. Grounding: <|ref|>object<|/ref|> locates an object, <|grounding|> captions with boxes."  # noqa: E501
IMAGE_3_DESCRIPTION = "Optional third image. With 3 or more images each is seen at 384x384 only (no tiles)."  # noqa: E501
TEMPERATURE_DESCRIPTION = "Randomness. 0 = greedy (always the most likely token); 0.7 or less recommended."  # noqa: E501
TOP_K_DESCRIPTION = "Sample only among the k most likely tokens. 0 = off."
TOP_P_DESCRIPTION = "Nucleus sampling: sample among the most likely tokens whose probabilities add up to top_p. 1 = off."  # noqa: E501
REPETITION_PENALTY_DESCRIPTION = "Penalty for tokens already in the prompt or answer. 1 = off. Not applied when temperature is 0."  # noqa: E501
MAX_LENGTH_TOKENS_DESCRIPTION = "Maximum number of tokens to generate (fewer when prompt and images leave less room in the 4096-token context)."  # noqa: E501
STOP_DESCRIPTION = "Comma-separated texts that end the answer, e.g. </answer>,###"
SEED_DESCRIPTION = "Random seed for reproducible sampling. Leave empty for a random one (printed in the logs)."  # noqa: E501

# GPU memory estimate: bf16 weights (2 bytes per parameter) plus 10% and 2 GiB for the CUDA
# context, activations of a 512-token prefill chunk, the vision tower and the KV cache.
BYTES_PER_PARAM = 2
HEADROOM_FACTOR = 1.10
HEADROOM_BYTES = 2 * 1024**3

GB = 1e9


@dataclass(frozen=True)
class PredictRequest:
    """Checked predict() arguments, ready for the engine."""

    prompt: str  # as given: <image> tags mark where the images go
    images: list[tuple[str, LocalPath]]  # (input name, file) in prompt order
    system_prompt: str
    temperature: float
    top_p: float
    top_k: int
    repetition_penalty: float
    max_new_tokens: int
    stop: tuple[str, ...]
    seed: Optional[int]


# ---------------------------------------------------------------------------------- inputs


def _given(value: Any) -> Any:
    """A direct `Predictor().predict(...)` call leaves `Input(...)` objects as the defaults."""
    return value.default if isinstance(value, FieldInfo) else value


def _check_number(name: str, value: Any, bounds: tuple[float, float], integer: bool) -> Any:
    low, high = bounds
    kind = "an integer" if integer else "a number"
    is_valid_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not is_valid_type or not math.isfinite(value):
        raise ValueError(f"{name} must be {kind} between {low} and {high}, got {value!r}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be between {low} and {high}, got {value!r}")
    return int(value) if integer else float(value)


# C0 control characters other than tab and newline, DEL, and C1 controls: invisible, never
# meaningful in a question, and a common residue of copy-paste. Carriage returns are newlines.
_CONTROL_CHARACTERS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_LONE_SURROGATES = re.compile("[\ud800-\udfff]")


def clean_text(text: str) -> str:
    """User text as the model gets it: CRLF and CR become LF; other C0 controls (except tab
    and LF), DEL and C1 controls are removed; lone UTF-16 surrogates become U+FFFD.

    Everything else is kept as typed: any script (CJK, right-to-left, ...), emoji with their
    zero-width joiners, and special-token strings (the processor decides what they mean).
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL_CHARACTERS.sub("", text)
    return _LONE_SURROGATES.sub("\ufffd", text)


def _check_text(name: str, value: Any, optional: bool) -> str:
    if value is None and optional:
        return ""
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a string, got {type(value).__name__}")
    if len(value) > MAX_TEXT_CHARS:
        raise ValueError(
            f"{name} is {len(value)} characters long; at most {MAX_TEXT_CHARS} are accepted "
            f"(the model's context holds {MAX_LENGTH_TOKENS_RANGE[1]} tokens in all)"
        )
    return clean_text(value)


def parse_stop_sequences(text: str) -> tuple[str, ...]:
    """Split a comma-separated list of stop sequences; surrounding spaces are dropped."""
    stops = tuple(piece.strip() for piece in text.split(",") if piece.strip())
    if len(stops) > MAX_STOP_SEQUENCES:
        raise ValueError(f"stop_sequences has {len(stops)} entries; at most {MAX_STOP_SEQUENCES}")
    return stops


def validate_inputs(
    *,
    image: Any,
    prompt: Any,
    image_2: Any,
    image_3: Any,
    image_4: Any,
    system_prompt: Any,
    temperature: Any,
    top_p: Any,
    top_k: Any,
    repetition_penalty: Any,
    max_length_tokens: Any,
    stop_sequences: Any,
    seed: Any,
) -> PredictRequest:
    """Check every predict() argument; raise ValueError with a message meant for the user.

    Runs inside predict(), so the checks hold for direct calls too, not only behind Cog's
    server (which rejects out-of-range values with HTTP 422 before predict runs). An
    argument still holding its ``Input(...)`` declaration (a direct call that left it out)
    takes that declaration's default.
    """
    files = {"image": image, "image_2": image_2, "image_3": image_3, "image_4": image_4}
    files = {name: _given(value) for name, value in files.items()}
    if files["image"] is None:
        raise ValueError("image is required")
    images = []
    for name in IMAGE_INPUTS:
        value = files[name]
        if value is None:
            continue
        if not isinstance(value, (str, os.PathLike)):
            raise ValueError(f"{name} must be a file, got {type(value).__name__}")
        images.append((name, LocalPath(value)))

    prompt = _check_text("prompt", _given(prompt), optional=False)
    if not prompt.strip():
        raise ValueError("prompt must not be empty: ask something about the image")
    stop_text = _check_text("stop_sequences", _given(stop_sequences), optional=True)
    seed = _given(seed)
    return PredictRequest(
        prompt=prompt,
        images=images,
        system_prompt=_check_text("system_prompt", _given(system_prompt), optional=True).strip(),
        temperature=_check_number("temperature", _given(temperature), TEMPERATURE_RANGE, False),
        top_p=_check_number("top_p", _given(top_p), TOP_P_RANGE, False),
        top_k=_check_number("top_k", _given(top_k), TOP_K_RANGE, True),
        repetition_penalty=_check_number(
            "repetition_penalty", _given(repetition_penalty), REPETITION_PENALTY_RANGE, False
        ),
        max_new_tokens=_check_number(
            "max_length_tokens", _given(max_length_tokens), MAX_LENGTH_TOKENS_RANGE, True
        ),
        stop=parse_stop_sequences(stop_text),
        seed=None if seed is None else _check_number("seed", seed, SEED_RANGE, True),
    )


# ------------------------------------------------------------------------------ checkpoint


def resolve_checkpoint(weights: Optional[str] = None) -> LocalPath:
    """The checkpoint directory to load, downloading the configured variant when needed.

    ``weights`` (Cog passes ``COG_WEIGHTS``) or the ``COG_WEIGHTS`` variable names a local
    directory in the official layout. Without it ``weights/`` is used; if that holds no complete
    checkpoint the variant in ``DSVL2_VARIANT`` (default deepseek-ai/deepseek-vl2) is
    downloaded into it.
    """
    explicit = weights or os.environ.get("COG_WEIGHTS")
    if explicit:
        path = LocalPath(str(explicit))
        if "://" in str(explicit) or not path.is_dir():
            raise ValueError(
                f"COG_WEIGHTS must be a local checkpoint directory, got {str(explicit)!r}"
            )
        missing = missing_checkpoint_files(path)
        if missing:
            raise ValueError(f"checkpoint directory {path} lacks: {', '.join(missing)}")
        return path

    repo_id = resolve_variant(os.environ.get(VARIANT_ENV) or DEFAULT_VARIANT)
    path = DEFAULT_WEIGHTS_DIR
    if not missing_checkpoint_files(path):
        _check_variant_matches(path, repo_id)
        return path
    return download(repo_id, path)


def _check_variant_matches(path: LocalPath, repo_id: str) -> None:
    """Refuse a weights/ directory holding another official variant than DSVL2_VARIANT asks."""
    if not os.environ.get(VARIANT_ENV):
        return
    wanted = repo_id.split("/", 1)[1]
    found = load_config(path).variant
    if variant_for_repo(repo_id) and found != "custom" and found != wanted:
        raise ValueError(
            f"{path} holds {found} but {VARIANT_ENV} asks for {wanted}: empty {path} to download "
            f"{wanted}, unset {VARIANT_ENV}, or point COG_WEIGHTS at the right directory"
        )


def count_parameters(checkpoint: LocalPath) -> int:
    """Number of weights in the checkpoint's safetensors files (headers only, nothing loaded)."""
    from safetensors import safe_open

    total = 0
    for file in weight_files(LocalPath(checkpoint)):
        with safe_open(str(file), framework="pt") as tensors:
            for key in tensors.keys():
                total += math.prod(tensors.get_slice(key).get_shape())
    return total


def gpu_bytes_needed(n_params: float) -> int:
    """Estimated GPU memory to serve a model of ``n_params`` parameters in bfloat16."""
    return int(n_params * BYTES_PER_PARAM * HEADROOM_FACTOR + HEADROOM_BYTES)


def check_gpu_memory(n_params: int, free_bytes: int, name: str) -> None:
    """Raise RuntimeError when ``free_bytes`` cannot hold the model; name a variant that fits."""
    needed = gpu_bytes_needed(n_params)
    if needed <= free_bytes:
        return
    variant_needs = {v: gpu_bytes_needed(v.billion_params * 1e9) for v in VARIANTS.values()}
    fitting = [v for v, need in variant_needs.items() if need <= free_bytes and need < needed]
    if fitting:
        best = max(fitting, key=lambda v: v.billion_params)
        advice = (
            f"Use a smaller variant: set {VARIANT_ENV}={best.repo_id} "
            f"(about {variant_needs[best] / GB:.0f} GB)."
        )
    else:
        smallest = min(variant_needs.values())
        advice = f"No DeepSeek-VL2 variant fits this GPU; the smallest needs {smallest / GB:.0f} GB."
    raise RuntimeError(
        f"{name} ({n_params / 1e9:.1f}B parameters) needs about {needed / GB:.0f} GB of GPU "
        f"memory but only {free_bytes / GB:.1f} GB is free. {advice}"
    )


# -------------------------------------------------------------------------------- failures

GPU_OUT_OF_MEMORY_MESSAGE = (
    "the GPU ran out of memory during this prediction. Try fewer or smaller images, a shorter "
    "prompt or a smaller max_length_tokens, or retry when the server is less busy"
)
HOST_OUT_OF_MEMORY_MESSAGE = (
    "the server ran out of memory (RAM) during this prediction. Try fewer or smaller images, "
    "a shorter prompt or a smaller max_length_tokens"
)
_HOST_OOM_TEXT = (
    "DefaultCPUAllocator: can't allocate memory",
    "DefaultCPUAllocator: not enough memory",
)


def _causes(error: BaseException) -> list[BaseException]:
    """`error` and the exceptions it was raised from or while handling, outermost first."""
    chain: list[BaseException] = []
    current: Optional[BaseException] = error
    while current is not None and all(current is not seen for seen in chain):
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def out_of_memory_kind(error: BaseException) -> Optional[str]:
    """"gpu" or "host" when `error` (or what caused it) is an allocation failure, else None."""
    for cause in _causes(error):
        if isinstance(cause, torch.OutOfMemoryError) or (
            isinstance(cause, RuntimeError) and "CUDA out of memory" in str(cause)
        ):
            return "gpu"
        if isinstance(cause, MemoryError) or (
            isinstance(cause, RuntimeError) and any(t in str(cause) for t in _HOST_OOM_TEXT)
        ):
            return "host"
    return None


def free_memory(error: Optional[BaseException] = None) -> None:
    """Release what a failed prediction held: the tensors its traceback frames still reference,
    Python garbage, and (on CUDA) the allocator's cached blocks."""
    for cause in _causes(error) if error is not None else []:
        if cause.__traceback__ is not None:
            traceback.clear_frames(cause.__traceback__)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def user_facing_error(error: Exception) -> Exception:
    """The exception a prediction should fail with in place of `error`; the message is for the user.

    Input problems (ValueError: unreadable images, a prompt that does not fit, bad numbers) are
    returned unchanged. An out-of-memory error frees memory (:func:`free_memory`) and becomes a
    RuntimeError saying what to change; an error without a message gets its type named. The
    original is kept as ``__cause__`` (in the server log's traceback). Use it in predict() as
    ``except Exception as error: raise user_facing_error(error)``.
    """
    if isinstance(error, ValueError):
        return error
    kind = out_of_memory_kind(error)
    if kind is not None:
        free_memory(error)
        message = GPU_OUT_OF_MEMORY_MESSAGE if kind == "gpu" else HOST_OUT_OF_MEMORY_MESSAGE
        friendly = RuntimeError(message)
    elif not str(error).strip():
        friendly = RuntimeError(
            f"internal error ({type(error).__name__}) while generating; the server keeps "
            "serving: retry, and report it if it happens again"
        )
    else:
        return error
    friendly.__cause__ = error
    return friendly


# ------------------------------------------------------------------------------- predictor


def concurrency_slots() -> int:
    """Predictions served at once: ``COG_MAX_CONCURRENCY`` (set by `cog build` from cog.yaml), else 1."""
    raw = os.environ.get("COG_MAX_CONCURRENCY", "1")
    try:
        return max(1, int(raw))
    except ValueError:
        print(f"ignoring COG_MAX_CONCURRENCY={raw!r}: not an integer", flush=True)
        return 1


def _checked_request(**arguments: Any) -> tuple[PredictRequest, SamplingParams]:
    """validate_inputs() plus the sampling parameters (a drawn seed when none was given)."""
    request = validate_inputs(**arguments)
    params = SamplingParams(
        temperature=request.temperature,
        top_p=request.top_p,
        top_k=request.top_k,
        repetition_penalty=request.repetition_penalty,
        max_new_tokens=request.max_new_tokens,
        seed=resolve_seed(request.seed),
        stop=request.stop,
    ).validate()
    return request, params


class Predictor(BasePredictor):
    """DeepSeek-VL2 behind Cog: setup() loads the model once, predict() streams answers.

    One prediction at a time per container (the default in cog.yaml): the answer streams token
    by token and a cancel stops generation at once. :class:`ConcurrentPredictor` serves several
    predictions at once in one batched decode step instead.
    """

    def setup(self, weights: Optional[str] = None) -> None:
        """Find or download the checkpoint, check GPU memory, load it and warm it up."""
        start = time.perf_counter()
        checkpoint = resolve_checkpoint(weights)
        device = default_device()
        dtype = default_dtype(device)
        name = load_config(checkpoint).variant
        if device.type == "cuda":
            free_bytes, _ = torch.cuda.mem_get_info(device)
            check_gpu_memory(count_parameters(checkpoint), free_bytes, name)
        else:
            print("no CUDA GPU found: running on the CPU in float32 (slow)", flush=True)
        self.engine = Generator.load(checkpoint, device=device, dtype=dtype)
        loaded = time.perf_counter()
        print(
            f"loaded {self.engine.variant} from {checkpoint} on {device} as {dtype} "
            f"in {loaded - start:.1f} s",
            flush=True,
        )
        self._warm_up()
        print(f"warm-up took {time.perf_counter() - loaded:.1f} s", flush=True)

    def _warm_up(self) -> None:
        """One tiny generation, so the first real request does not pay for lazy GPU setup."""
        blank = Image.new("RGB", (64, 64), (127, 127, 127))
        prepared = self.engine.prepare(f"{IMAGE_TAG}\nWhat is this?", [blank])
        for _ in self.engine.stream(prepared, SamplingParams(temperature=0.0, max_new_tokens=2)):
            pass

    @cog.streaming
    def predict(
        self,
        image: Path = Input(description="Image to ask about."),
        prompt: str = Input(description=PROMPT_DESCRIPTION),
        image_2: Optional[Path] = Input(default=None, description="Optional second image."),
        image_3: Optional[Path] = Input(default=None, description=IMAGE_3_DESCRIPTION),
        image_4: Optional[Path] = Input(default=None, description="Optional fourth image."),
        system_prompt: Optional[str] = Input(
            default=None, description="Optional text placed before the conversation."
        ),
        temperature: float = Input(
            default=0.1, ge=0.0, le=2.0, description=TEMPERATURE_DESCRIPTION
        ),
        top_p: float = Input(default=0.9, ge=0.01, le=1.0, description=TOP_P_DESCRIPTION),
        top_k: int = Input(default=0, ge=0, le=1000, description=TOP_K_DESCRIPTION),
        repetition_penalty: float = Input(
            default=1.1, ge=1.0, le=2.0, description=REPETITION_PENALTY_DESCRIPTION
        ),
        max_length_tokens: int = Input(
            default=2048, ge=1, le=4096, description=MAX_LENGTH_TOKENS_DESCRIPTION
        ),
        stop_sequences: Optional[str] = Input(default=None, description=STOP_DESCRIPTION),
        seed: Optional[int] = Input(
            default=None, ge=0, le=4294967295, description=SEED_DESCRIPTION
        ),
    ) -> ConcatenateIterator[str]:
        """Answer the prompt about the image(s), streaming the text as it is generated."""
        started = time.perf_counter()
        request, params = _checked_request(
            image=image, prompt=prompt, image_2=image_2, image_3=image_3, image_4=image_4,
            system_prompt=system_prompt, temperature=temperature, top_p=top_p, top_k=top_k,
            repetition_penalty=repetition_penalty, max_length_tokens=max_length_tokens,
            stop_sequences=stop_sequences, seed=seed,
        )  # fmt: skip
        try:
            images, prepared = self._prepare(request, params)
            first_piece = True
            for piece in self.engine.stream(prepared, params):
                if first_piece:
                    self._record_first_token(started)
                    first_piece = False
                yield piece
            self._record_finish(self.engine.last_stats, started, first_piece)
        except Exception as error:  # noqa: BLE001 - turned into a message for the user
            raise user_facing_error(error)

    def _prepare(self, request: PredictRequest, params: SamplingParams) -> tuple[list[Image.Image], Any]:
        """Decode the images, build the model inputs and log what the model will see."""
        images = [load_image(path, name=name) for name, path in request.images]
        prepared = self.engine.prepare(request.prompt, images, request.system_prompt)
        input_tokens = int(prepared.input_ids.numel())
        self._log_request(images, prepared, input_tokens, params.seed)
        self.record_metric("input_token_count", input_tokens)
        budget = self.engine.budget(input_tokens, params.max_new_tokens)
        if budget < params.max_new_tokens:
            print(f"max_length_tokens lowered from {params.max_new_tokens} to {budget}: prompt and "
                  f"answer must fit the {self.engine.context_length}-token context", flush=True)
        return images, prepared

    def _record_first_token(self, started: float) -> None:
        # From the start of predict(): image decoding and prefill included.
        self.record_metric("time_to_first_token", time.perf_counter() - started)

    def _record_finish(self, stats: Any, started: float, nothing_emitted: bool) -> None:
        if nothing_emitted:  # nothing visible was generated (e.g. eos straight away)
            self._record_first_token(started)
        self.record_metric("output_token_count", stats.new_tokens)
        if stats.tokens_per_second > 0:  # needs two tokens or more
            self.record_metric("tokens_per_second", stats.tokens_per_second)
        print(f"generated {stats.new_tokens} tokens ({stats.finish_reason})", flush=True)

    def _log_request(
        self, images: list[Image.Image], prepared: Any, input_tokens: int, seed: int
    ) -> None:
        """Print what the model sees: variant, per-image size/tiles/tokens, prompt length, seed."""
        crops = prepared.images_spatial_crop.tolist()  # [n_images, 2]: (tiles across, down)
        print(f"variant: {self.engine.variant}", flush=True)
        for index, (img, (across, down), n_tokens) in enumerate(
            zip(images, crops, prepared.num_image_tokens), start=1
        ):
            print(
                f"image {index}: {img.width}x{img.height} px, global view + {across}x{down} "
                f"local tiles, {n_tokens} tokens",
                flush=True,
            )
        print(f"prompt tokens: {input_tokens}, seed: {seed}", flush=True)


class ConcurrentPredictor(Predictor):
    """Serves up to 8 predictions at once, batched in one decode step on the GPU.

    Cog runs concurrent predictions only for an async predict (``concurrency.max`` in cog.yaml,
    ``COG_MAX_CONCURRENCY`` for the server). Requests feed one
    :class:`deepseek_vl2.engine.scheduler.BatchScheduler`; each streams its own text and can be
    cancelled alone. Note: Cog 0.23.1's server (coglet) sends the output of an async predict in
    one burst when it finishes, so with this predictor text arrives at the end, not token by token.
    """

    def setup(self, weights: Optional[str] = None) -> None:
        """Load and warm up the model, then start the scheduler with one cache slot per prediction."""
        super().setup(weights)
        slots = concurrency_slots()
        self.scheduler = BatchScheduler(self.engine, max_batch=slots)
        print(f"serving up to {slots} prediction(s) at once in one batch "
              f"({self.scheduler.cache.nbytes() / 2**20:.0f} MiB KV cache)", flush=True)

    # The inputs repeat Predictor.predict's on purpose: `cog build` reads each predict() signature
    # statically, so it cannot be shared; tests/test_predict_inputs.py checks the two agree.
    @cog.streaming
    @cog.concurrent(max=8)
    async def predict(  # type: ignore[override]
        self,
        image: Path = Input(description="Image to ask about."),
        prompt: str = Input(description=PROMPT_DESCRIPTION),
        image_2: Optional[Path] = Input(default=None, description="Optional second image."),
        image_3: Optional[Path] = Input(default=None, description=IMAGE_3_DESCRIPTION),
        image_4: Optional[Path] = Input(default=None, description="Optional fourth image."),
        system_prompt: Optional[str] = Input(
            default=None, description="Optional text placed before the conversation."
        ),
        temperature: float = Input(
            default=0.1, ge=0.0, le=2.0, description=TEMPERATURE_DESCRIPTION
        ),
        top_p: float = Input(default=0.9, ge=0.01, le=1.0, description=TOP_P_DESCRIPTION),
        top_k: int = Input(default=0, ge=0, le=1000, description=TOP_K_DESCRIPTION),
        repetition_penalty: float = Input(
            default=1.1, ge=1.0, le=2.0, description=REPETITION_PENALTY_DESCRIPTION
        ),
        max_length_tokens: int = Input(
            default=2048, ge=1, le=4096, description=MAX_LENGTH_TOKENS_DESCRIPTION
        ),
        stop_sequences: Optional[str] = Input(default=None, description=STOP_DESCRIPTION),
        seed: Optional[int] = Input(
            default=None, ge=0, le=4294967295, description=SEED_DESCRIPTION
        ),
    ) -> AsyncConcatenateIterator[str]:
        """Answer the prompt about the image(s); runs beside other predictions in one batch."""
        started = time.perf_counter()
        request, params = _checked_request(
            image=image, prompt=prompt, image_2=image_2, image_3=image_3, image_4=image_4,
            system_prompt=system_prompt, temperature=temperature, top_p=top_p, top_k=top_k,
            repetition_penalty=repetition_penalty, max_length_tokens=max_length_tokens,
            stop_sequences=stop_sequences, seed=seed,
        )  # fmt: skip
        handle = None
        try:
            # Decoding images and tiling them is CPU work: keep it off the event loop.
            _, prepared = await asyncio.to_thread(self._prepare, request, params)
            handle = self.scheduler.submit(prepared, params)
            first_piece = True
            async for piece in handle:
                if first_piece:
                    self._record_first_token(started)
                    first_piece = False
                yield piece
            self._record_finish(handle.stats, started, first_piece)
        except Exception as error:  # noqa: BLE001 - turned into a message for the user
            raise user_facing_error(error)
        finally:
            if handle is not None:
                handle.cancel()  # no-op when finished; frees the slot when cancelled or failed

"""The model behind the server: loaded once, up to N predictions batched in one decode step.

:class:`Service` is what predict.py's ``run()`` calls. ``answer()`` is a coroutine (so Cog's
server can run several at once) that checks nothing itself (the arguments were checked by
:func:`deepseek_vl2.serving.inputs.validate_inputs`), prepares the images off the event loop,
submits the request to the :class:`~deepseek_vl2.engine.scheduler.BatchScheduler` and returns a
sync generator of text pieces: streamed item by item by Cog's server while the scheduler
decodes, and stopped by a cancel through :mod:`deepseek_vl2.serving.coglet_bridge`. Without the
bridge the coroutine collects the answer itself and returns it complete.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import logging
import sys
import threading
import time
from typing import Any, Callable, Iterator, Optional

import torch
from PIL import Image

from deepseek_vl2 import weights
from deepseek_vl2.engine.config import EngineConfig
from deepseek_vl2.engine.generation import Generator
from deepseek_vl2.engine.sampling import SamplingParams
from deepseek_vl2.engine.handle import RequestHandle
from deepseek_vl2.engine.scheduler import BatchScheduler
from deepseek_vl2.grounding import parse_grounding
from deepseek_vl2.inputs.images import load_image
from deepseek_vl2.model.checkpoint import default_device, default_dtype, weight_files
from deepseek_vl2.model.config import load_config
from deepseek_vl2.serving import coglet_bridge
from deepseek_vl2.serving.errors import user_facing_error
from deepseek_vl2.serving.inputs import PredictRequest
from deepseek_vl2.serving.setup_phases import SetupPhases

IMAGE_TAG = "<image>"
Record = Callable[[str, Any], None]  # record_metric(name, value)


class _PrintHandler(logging.Handler):
    """Engine log records as plain lines on the current stdout (Cog routes it per prediction).

    A line that cannot be written (a closed or broken stdout) is reported by logging's
    ``handleError`` and dropped: logging never raises into the engine."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            print(self.format(record), file=sys.stdout, flush=True)
        except Exception:  # noqa: BLE001 - the logging contract: emit does not raise
            self.handleError(record)


def _show_engine_logs() -> None:
    logger = logging.getLogger("deepseek_vl2")
    if not any(isinstance(h, _PrintHandler) for h in logger.handlers):
        logger.addHandler(_PrintHandler())
    logger.setLevel(logging.INFO)


class Service:
    """The loaded model, its scheduler and how a prediction runs on them."""

    def __init__(self, engine: Generator, settings: EngineConfig) -> None:
        self.engine = engine
        self.scheduler = BatchScheduler(engine, max_batch=settings.slots, max_waiting=settings.max_waiting,
                                        step_timeout=settings.step_timeout_seconds)
        self.streaming, mode = coglet_bridge.install(settings.streaming)
        print(f"serving up to {settings.slots} prediction(s) at once in one batch "
              f"({self.scheduler.cache.nbytes() / 2**20:.0f} MiB KV cache); {mode}", flush=True)

    @classmethod
    def start(cls, weights_source: Optional[str] = None, settings: Optional[EngineConfig] = None) -> "Service":
        """Find or download the checkpoint, check GPU memory, load it, warm it up.

        ``settings`` default to :meth:`EngineConfig.from_environment`, read here, once (an
        invalid value stops setup with a message naming the variable).
        """
        phases = SetupPhases()
        _show_engine_logs()
        settings = settings if settings is not None else EngineConfig.from_environment()
        checkpoint = weights.resolve_checkpoint(weights_source)
        phases.done("find/download")
        config = load_config(checkpoint)  # config.json and the file list are read once, here
        files = weight_files(checkpoint)
        device = default_device()
        dtype = default_dtype(device)
        free_bytes = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None
        if free_bytes is None:
            print("no CUDA GPU found: running on the CPU in float32 (slow)", flush=True)
        quantize_setting = settings.quantize
        plan = weights.fit_memory(quantize_setting, config, weights.parameters_on_disk(files), free_bytes,
                                  slots=settings.slots, prefill_chunk=settings.prefill_chunk, kv_bucket=settings.kv_bucket,
                                  graphs=settings.compile_on(device.type), dtype=dtype)
        quantize, settings = plan.fmt, dataclasses.replace(settings, slots=plan.slots)  # fewer if the GPU holds fewer
        # The persistent decode state (KV cache + step buffers) is sized here for every slot.
        engine = Generator.load(checkpoint, device=device, dtype=dtype, prefill_chunk=settings.prefill_chunk,
                                compile=settings.compile, max_batch=settings.slots, kv_bucket=settings.kv_bucket,
                                config=config, weight_files=files, quantize=quantize,
                                prefix_cache=settings.prefix_cache)
        phases.done("load" if quantize == "none" else f"load + quantize to {quantize}")
        weight_gb = sum(p.nbytes for p in engine.model.parameters()) / 1e9
        print(f"loaded {engine.variant} from {checkpoint} on {device} as {dtype} "
              f"in {phases.elapsed():.1f} s; weights {weight_gb:.2f} GB, experts "
              f"{'in ' + quantize if quantize != 'none' else 'unquantized'} ({weights.QUANTIZE_ENV}="
              f"{quantize_setting})", flush=True)
        engine.warmup(max_seconds=settings.warmup_seconds)  # before the scheduler thread exists; says its path
        phases.decode_warmup_done(engine.engine.warmup_summary)
        service = cls(engine, settings)
        blank = Image.new("RGB", (64, 64), (127, 127, 127))  # first request pays no lazy setup
        service.scheduler.run(engine.prepare(f"{IMAGE_TAG}\nWhat is this?", [blank]),
                              SamplingParams(temperature=0.0, max_new_tokens=2))
        phases.done("warm-up request")
        phases.report()
        return service

    # ------------------------------------------------------------------------- predictions
    def healthy(self) -> bool:
        """False once the engine cannot serve (its loop stopped, or a step is stuck beyond its limit);
        the reason is printed. Cog's health check asks this (predict.py ``healthcheck``)."""
        fault = self.scheduler.fault()
        if fault is not None:
            print(f"unhealthy: {fault}", flush=True)
        return fault is None

    async def answer(self, request: PredictRequest, record: Record) -> Iterator[str]:
        """Run one prediction beside the others; returns its text pieces (see the module doc)."""
        started = time.perf_counter()
        hooks = coglet_bridge.cancel_hooks()  # None: no bridge, collect the answer here
        cancelled = threading.Event()
        submitted: list[RequestHandle] = []

        def on_cancel() -> None:  # runs in coglet's control thread
            cancelled.set()
            for handle in submitted:
                handle.cancel()

        if hooks is not None:
            hooks.append(on_cancel)
        if (fault := self.scheduler.fault()) is not None:  # fail at once, before any input work
            raise fault
        try:
            # Decoding and tiling images is CPU work: keep it off the shared event loop.
            images, prepared = await asyncio.to_thread(self._prepare, request, record)
            handle = self.scheduler.submit(prepared, request.params)
        except Exception as error:  # noqa: BLE001 - becomes a message for the user
            raise user_facing_error(error)
        submitted.append(handle)
        print(f"prompt tokens: {handle.stats.prompt_tokens}, seed: {handle.stats.seed}", flush=True)
        if cancelled.is_set():
            handle.cancel()
        if hooks is None:  # the supported mode: collect here, where a cancel reaches us
            pieces: list[str] = []
            try:
                async for piece in handle:
                    if not pieces:
                        record("time_to_first_token", time.perf_counter() - started)
                    pieces.append(piece)
            except Exception as error:  # noqa: BLE001
                raise user_facing_error(error)
            finally:
                handle.cancel()  # no-op when finished; frees the slot when cancelled
                self._finish(handle, images, "".join(pieces), started, bool(pieces), record)
            return (piece for piece in pieces)
        # Cog's server iterates the generator in another thread, where its per-prediction log
        # and metric routing is not this coroutine's: run every step in this context.
        return _in_context(contextvars.copy_context(),
                           self._stream(handle, images, cancelled, started, record))

    def _stream(self, handle: RequestHandle, images: list[Image.Image], cancelled: threading.Event,
                started: float, record: Record) -> Iterator[str]:
        """Iterated by Cog's server in the prediction's thread, one piece as soon as it exists."""
        pieces: list[str] = []
        try:
            for piece in handle:
                if not pieces:
                    record("time_to_first_token", time.perf_counter() - started)
                pieces.append(piece)
                yield piece
        except Exception as error:  # noqa: BLE001
            raise user_facing_error(error)
        finally:
            handle.cancel()  # also when the server stops iterating
        if cancelled.is_set():
            record("cached_input_token_count", handle.stats.cached_tokens)
            record("output_token_count", handle.stats.new_tokens)
            print(f"cancelled after {handle.stats.new_tokens} tokens "
                  f"({len(''.join(pieces))} characters streamed)", flush=True)
            raise asyncio.CancelledError("cancelled by the client")
        self._finish(handle, images, "".join(pieces), started, bool(pieces), record)

    def _prepare(self, request: PredictRequest, record: Record) -> tuple[list[Image.Image], Any]:
        """Decode the images, build the model inputs and log what the model will see."""
        images = [load_image(path, name=name) for name, path in request.images]
        prepared = self.engine.prepare(request.prompt, images, request.system_prompt, request.history)
        record("input_token_count", int(prepared.input_ids.numel()))
        crops = prepared.images_spatial_crop.tolist()  # [n_images, 2]: (tiles across, down)
        print(f"variant: {self.engine.variant}", flush=True)
        for index, (img, (across, down), n_tokens) in enumerate(
            zip(images, crops, prepared.num_image_tokens), start=1
        ):
            print(f"image {index}: {img.width}x{img.height} px, global view + {across}x{down} "
                  f"local tiles, {n_tokens} tokens", flush=True)
        return images, prepared

    def _finish(self, handle: RequestHandle, images: list[Image.Image], text: str, started: float,
                emitted: bool, record: Record) -> None:
        stats = handle.stats
        if not emitted:  # nothing visible was generated (e.g. eos straight away)
            record("time_to_first_token", time.perf_counter() - started)
        record("cached_input_token_count", stats.cached_tokens)  # prompt tokens whose KV a parked slot held
        record("output_token_count", stats.new_tokens)
        if stats.tokens_per_second > 0:  # needs two tokens or more
            record("tokens_per_second", stats.tokens_per_second)
        print(f"generated {stats.new_tokens} tokens ({stats.finish_reason})", flush=True)
        log_grounding(text, images)


def _in_context(context: contextvars.Context, pieces: Iterator[str]) -> Iterator[str]:
    """``pieces``, each step run inside ``context`` (prints and metrics reach this prediction)."""
    try:
        while True:
            try:
                piece = context.run(next, pieces)
            except StopIteration:
                return
            yield piece
    finally:
        context.run(pieces.close)


def log_grounding(text: str, images: list[Image.Image]) -> None:
    """Print the boxes of a grounding answer in pixels of the last image, the one they refer to."""
    if "<|det|>" not in text and "<｜det｜>" not in text:
        return
    result = parse_grounding(text, image_size=images[-1].size if images else None)
    width, height = result.image_size or (0, 0)
    print(f"grounding: {len(result.objects)} object(s), boxes in pixels of image {len(images)} "
          f"({width}x{height}, x1 y1 x2 y2):", flush=True)
    for obj in result.objects:
        boxes = "; ".join(" ".join(f"{v:.0f}" for v in box) for box in obj.boxes or [])
        print(f"  {obj.label}: {boxes}", flush=True)
    for problem in result.problems:
        print(f"  (grounding: {problem})", flush=True)


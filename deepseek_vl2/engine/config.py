"""The engine's settings: one frozen :class:`EngineConfig`, read from the environment once, at setup.

:meth:`EngineConfig.from_environment` is the only reader of these variables (the table, with
defaults and allowed values, is in docs/deployment.md, "Settings"); everything below it
(the :class:`~.generation.Generator`, the :class:`~.scheduler.BatchScheduler`, the streaming
bridge) takes the values it needs as arguments. An invalid value is refused with one error that
names the variable and the values it accepts. The checkpoint's own variables (``COG_WEIGHTS``,
``DSVL2_VARIANT``, ...) belong to finding the weights and are read in
:mod:`deepseek_vl2.weights.resolve`.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Literal, Mapping, Optional

from deepseek_vl2.model.quantization import QUANTIZE_ENV, QUANTIZE_SETTINGS

SLOTS_ENV = "COG_MAX_CONCURRENCY"  # written into a built image by `cog build` from @cog.concurrent
COMPILE_ENV = "DSVL2_COMPILE"
WARMUP_SECONDS_ENV = "DSVL2_WARMUP_SECONDS"
STREAMING_ENV = "DSVL2_STREAMING"
PREFIX_CACHE_ENV = "DSVL2_PREFIX_CACHE"
STEP_TIMEOUT_ENV = "DSVL2_STEP_TIMEOUT_SECONDS"

DEFAULT_PREFILL_CHUNK = 512  # prompt tokens per prefill step: a long prompt delays others by one chunk a turn
DEFAULT_KV_BUCKET = 256  # decode steps attend over the cache rounded up to a multiple of this
DEFAULT_MAX_WAITING = 64  # requests queued beyond the slots before submit() refuses (CapacityError)
DEFAULT_WARMUP_SECONDS = 300.0
# One scheduler step (a prompt chunk, a decode step) may run this long before its requests fail.
# It must exceed the slowest legitimate step: a decode bucket compiled on first use (a cold
# compile of the 30-layer model is about 75 s of one CPU core, docs/benchmark.md) or a 512-token
# prompt chunk of the largest model on the CPU; 600 s is several times either.
DEFAULT_STEP_TIMEOUT_SECONDS = 600.0
StreamingMode = Literal["auto", "collect"]
STREAMING_MODES: tuple[StreamingMode, ...] = ("auto", "collect")


class ConfigError(ValueError):
    """An engine setting has a value the engine does not accept; the message names the variable."""


@dataclass(frozen=True)
class EngineConfig:
    """Every engine setting, checked on construction.

    slots: requests decoded together (``COG_MAX_CONCURRENCY``); the decode state holds this many.
    compile: compile the decode step (``DSVL2_COMPILE`` 1/0); None: compiled on CUDA, eager on the CPU.
    warmup_seconds: seconds setup may spend compiling and capturing the decode step
        (``DSVL2_WARMUP_SECONDS``); past them the engine falls back to the eager step (logged).
    streaming: "auto" streams through the coglet bridge where supported, "collect" sends each
        answer complete (``DSVL2_STREAMING``).
    prefill_chunk: prompt tokens written per prefill step.
    kv_bucket: decode steps attend over the cache rounded up to a multiple of this.
    max_waiting: requests that may wait for a slot before new ones are refused.
    quantize: expert weight format asked for (``DSVL2_QUANTIZE``: auto, none, int8, fp8); setup
        turns "auto" into the format that fits (deepseek_vl2/weights/sizing.py).
    prefix_cache: finished requests' slots stay parked with their tokens and a request beginning
        with them reuses that KV (``DSVL2_PREFIX_CACHE`` 1/0; engine/prefix_cache.py).
    step_timeout_seconds: seconds one scheduler step may run before its requests fail and the
        server reports itself unhealthy (``DSVL2_STEP_TIMEOUT_SECONDS``).
    """

    slots: int = 1
    compile: Optional[bool] = None
    warmup_seconds: float = DEFAULT_WARMUP_SECONDS
    streaming: StreamingMode = "auto"
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK
    kv_bucket: int = DEFAULT_KV_BUCKET
    max_waiting: int = DEFAULT_MAX_WAITING
    quantize: str = "auto"
    prefix_cache: bool = True
    step_timeout_seconds: float = DEFAULT_STEP_TIMEOUT_SECONDS

    def __post_init__(self) -> None:
        for name in ("slots", "prefill_chunk", "kv_bucket"):
            value = getattr(self, name)
            if not _is_integer(value) or value < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
        if not _is_integer(self.max_waiting) or self.max_waiting < 0:
            raise ConfigError(f"max_waiting must be an integer >= 0, got {self.max_waiting!r}")
        if self.compile not in (None, True, False):
            raise ConfigError(f"compile must be True, False or None (by device), got {self.compile!r}")
        seconds = self.warmup_seconds
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not math.isfinite(seconds) \
                or seconds < 0:
            raise ConfigError(f"warmup_seconds must be a finite number >= 0, got {seconds!r}")
        if self.prefix_cache not in (True, False):
            raise ConfigError(f"prefix_cache must be True or False, got {self.prefix_cache!r}")
        timeout = self.step_timeout_seconds
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not math.isfinite(timeout) \
                or timeout <= 0:
            raise ConfigError(f"step_timeout_seconds must be a finite number > 0, got {timeout!r}")
        if self.streaming not in STREAMING_MODES:
            raise ConfigError(f"streaming must be one of {', '.join(STREAMING_MODES)}, got {self.streaming!r}")
        if self.quantize not in QUANTIZE_SETTINGS:  # the one check of DSVL2_QUANTIZE (from_environment passes it on)
            raise ConfigError(f"{QUANTIZE_ENV} (quantize) must be one of {', '.join(QUANTIZE_SETTINGS)}, "
                              f"got {self.quantize!r}")

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] = os.environ) -> "EngineConfig":
        """The settings ``environ`` gives (unset or empty: the default); raises ConfigError."""
        values: dict[str, object] = {}
        if raw := _read(environ, SLOTS_ENV):
            values["slots"] = _parse(SLOTS_ENV, raw, int, "an integer >= 1", lambda n: n >= 1)
        if raw := _read(environ, COMPILE_ENV):
            if raw not in ("0", "1"):
                raise ConfigError(f"{COMPILE_ENV} must be 0 (eager) or 1 (compiled), got {raw!r}")
            values["compile"] = raw == "1"
        if raw := _read(environ, PREFIX_CACHE_ENV):
            if raw not in ("0", "1"):
                raise ConfigError(f"{PREFIX_CACHE_ENV} must be 0 (off) or 1 (on), got {raw!r}")
            values["prefix_cache"] = raw == "1"
        if raw := _read(environ, WARMUP_SECONDS_ENV):
            values["warmup_seconds"] = _parse(WARMUP_SECONDS_ENV, raw, float, "a number of seconds >= 0",
                                              lambda s: math.isfinite(s) and s >= 0)
        if raw := _read(environ, STEP_TIMEOUT_ENV):
            values["step_timeout_seconds"] = _parse(STEP_TIMEOUT_ENV, raw, float, "a number of seconds > 0",
                                                    lambda s: math.isfinite(s) and s > 0)
        if raw := _read(environ, STREAMING_ENV):
            mode = raw.lower()
            if mode not in STREAMING_MODES:
                raise ConfigError(f"{STREAMING_ENV} must be {' or '.join(STREAMING_MODES)}, got {raw!r}")
            values["streaming"] = mode
        if raw := _read(environ, QUANTIZE_ENV):
            values["quantize"] = raw.lower()
        return cls(**values)  # type: ignore[arg-type]

    def compile_on(self, device_type: str) -> bool:
        """Whether the decode step is compiled on a device of this type ("cuda", "cpu", ...)."""
        return resolve_compile(self.compile, device_type)


def resolve_compile(compile: Optional[bool], device_type: str) -> bool:
    """``compile`` when given; otherwise compiled on CUDA and eager elsewhere."""
    return device_type == "cuda" if compile is None else bool(compile)


def _is_integer(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _read(environ: Mapping[str, str], name: str) -> str:
    return environ.get(name, "").strip()


def _parse(name: str, raw: str, parse, allowed: str, accept) -> object:
    try:
        value = parse(raw)
    except ValueError:
        value = None
    if value is None or not accept(value):
        raise ConfigError(f"{name} must be {allowed}, got {raw!r}")
    return value

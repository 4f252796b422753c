"""Benchmark DeepSeek-VL2 through its engine: time to first token and decode speed, eager and
compiled side by side (alternating runs in one process), the bandwidth fraction, concurrency and
the rows of the GPU target table (docs/benchmark.md).

The model is random weights of a variant's real shape drawn directly on the device
(``--random-weights``, the default; ``tools/random_model.py``; ``--layers`` / ``--vision-layers``
shorten it for CPU runs, ``--size reduced`` makes it tiny for smoke runs), or ``--checkpoint DIR``
(then setup is timed against a plain read of the weight files). One model serves every mode: each
mode is a ``Generator`` over it with its ``BatchScheduler``: ``eager`` or ``compiled``
(``torch.compile`` region by region, CUDA graphs on CUDA). A mode that fails (a compiler missing,
say: its warm-up falls back to eager) is dropped with a ``mode_failed`` line; the other modes go
on. ``--setup-only`` times setup's phases instead (tools/bench_setup.py). Every request goes through the scheduler, the path
that serves, with ``SamplingParams(temperature=0, ignore_eos=True)``, so it produces exactly
``--new-tokens`` tokens; the figures come from the request's stats: TTFT from the start of the
request (embedding, vision tower, prefill) to the first token id on the host, decode speed
(new − 1) / (total − TTFT). Processor time is reported separately. One sampled request per mode
(temperature 0.7, top_p 0.9) gives the ``sampled`` figures (the full sampler in the step).

``--jsonl FILE`` appends one JSON line per figure as soon as it is measured (a run stopped at a
time limit keeps what it had): events ``setup``, ``warmup``, ``run``, ``sampled``, ``row``,
``mode_failed`` and ``done``.

    python -m tools.benchmark --variant tiny --layers 6 --vision-layers 2 --dtype bfloat16 \\
        --threads 2 --image 300x200 --prompt-tokens 440 --new-tokens 128 --repeats 2
    python -m tools.benchmark --variant small --target-rows --json      # on a GPU
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]

from deepseek_vl2.engine.generation import DEFAULT_PREFILL_CHUNK, Generator  # noqa: E402
from deepseek_vl2.engine.sampling import SamplingParams  # noqa: E402
from deepseek_vl2.engine.scheduler import BatchScheduler  # noqa: E402
from deepseek_vl2.inputs.processor import DeepseekVL2Processor, ProcessedInputs  # noqa: E402
from deepseek_vl2.model.checkpoint import load_model, weight_files  # noqa: E402
from deepseek_vl2.model.multimodal import DeepseekVL2  # noqa: E402
from deepseek_vl2.model.moe import quantize_experts  # noqa: E402
from tools.bench_conversation import prefix_cache_figures  # noqa: E402
from tools.bench_figures import (  # noqa: E402
    Report, activated_parameters, kv_cache_bytes_per_position, memory_check, peak_bandwidth_gbs, peak_memory_bytes,
    read_files_seconds, reset_peak_memory, synthetic_image,
)
from tools.bench_setup import setup_only  # noqa: E402
from tools.random_model import build_random_model  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
MODES = ("eager", "compiled")
QUANTIZE = ("none", "int8", "fp8")
DEFAULT_PROMPT = "Describe this image in detail."
ROW_KEYS = ("decode", "ttft", "e2e_1428", "e2e_demo", "concurrency", "prefix", "setup", "memory")
FILLER = " describe"
__all__ = ["activated_parameters", "kv_cache_bytes_per_position", "main"]


# ----------------------------------------------------------------------------- arguments
def parse_image_size(text: str) -> Optional[tuple[int, int]]:
    """``"768x384"`` → (768, 384); ``"none"`` → None (text-only prompt)."""
    if text.lower() == "none":
        return None
    width, sep, height = text.lower().partition("x")
    if not sep or not width.isdigit() or not height.isdigit() or int(width) < 1 or int(height) < 1:
        raise argparse.ArgumentTypeError(f"image size must look like 768x384 or none, got {text!r}")
    return int(width), int(height)


def parse_list(text: str, allowed: Optional[tuple[str, ...]] = None) -> list[str]:
    """``"a,b"`` → ["a", "b"], each in ``allowed`` when given."""
    items = [part.strip() for part in text.split(",") if part.strip()]
    bad = [item for item in items if allowed and item not in allowed]
    if not items or bad:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of {allowed or 'values'}, got {text!r}")
    return items


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--random-weights", action="store_true", help="random weights on the device (default)")
    source.add_argument("--checkpoint", type=Path, help="benchmark this checkpoint folder instead")
    parser.add_argument("--variant", choices=("tiny", "small", "base"), default="tiny")
    parser.add_argument("--size", choices=("real", "reduced"), default="real",
                        help="real: the published shapes; reduced: widths ~64 (smoke runs)")
    parser.add_argument("--layers", type=int, help="shorten the language model to N layers")
    parser.add_argument("--vision-layers", type=int, help="shorten the vision tower to N blocks")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=tuple(DTYPES), help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--modes", type=lambda t: parse_list(t, MODES), default=["eager", "compiled"],
                        help="decode paths to compare, alternating (default eager,compiled)")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per mode, alternating (default 2)")
    parser.add_argument("--image", type=parse_image_size, default=(300, 200), metavar="WxH",
                        help="synthetic image size (300x200 = global view + 1 tile), or none")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT)
    parser.add_argument("--prompt-tokens", type=int, help="pad the prompt with filler words to about N tokens")
    parser.add_argument("--new-tokens", type=int, default=128, help="tokens per timed request, eos ignored (>= 2)")
    parser.add_argument("--prefill-chunk", type=int, default=DEFAULT_PREFILL_CHUNK)
    parser.add_argument("--max-len", type=int, help="tokens per slot of the decode state (default: the context)")
    parser.add_argument("--warmup-seconds", type=float, default=300.0, help="bound on the compiled warm-up")
    parser.add_argument("--peak-bandwidth-gbs", type=float,
                        help="GPU memory bandwidth for the bound (default: from the GPU's name, e.g. H200 4800)")
    parser.add_argument("--concurrency", type=int, default=8, help="requests at once in the concurrency row")
    parser.add_argument("--target-rows", action="store_true", help="also measure the GPU target table's rows")
    parser.add_argument("--rows", type=lambda t: parse_list(t, ROW_KEYS), default=list(ROW_KEYS),
                        help=f"which target rows (default all: {','.join(ROW_KEYS)})")
    parser.add_argument("--row-new-tokens-scale", type=float, default=1.0,
                        help="scale the target rows' new-token counts (smoke runs)")
    parser.add_argument("--quantize", type=lambda t: parse_list(t, QUANTIZE), default=["none"],
                        help="expert weight formats, comma-separated (several: 'none' first, alternated)")
    parser.add_argument("--sampled", choices=("warmed", "unwarmed", "off"), default="warmed",
                        help="the sampled request: its full step warmed first (a compile per compiled mode), "
                             "unwarmed (runs the eager full step after the greedy warm-up: no compile), or off")
    parser.add_argument("--setup-only", action="store_true",
                        help="time setup's phases only (load, compile, capture) for the first of --modes")
    parser.add_argument("--setup-slots", type=int, default=1, help="decode slots warmed in --setup-only (default 1)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.add_argument("--jsonl", type=Path, help="append one JSON line per figure to this file as it is measured")
    args = parser.parse_args(argv)
    if len(args.quantize) > 1 and args.quantize[0] != "none":
        parser.error("--quantize with several formats must start with none (the others are quantized from it)")
    if args.new_tokens < 2:
        parser.error("--new-tokens must be at least 2 (one prefill token + decode steps)")
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    args.device = torch.device(args.device)
    args.dtype = args.dtype or ("bfloat16" if args.device.type == "cuda" else "float32")
    return args


# ----------------------------------------------------------------------------- JSON lines
class Events:
    """Appends one JSON line per measured figure to a file (nothing without a path)."""

    def __init__(self, path: Optional[Path]) -> None:
        self.path = path
        self.fields: dict[str, Any] = {}  # added to every line (source, variant)

    def __call__(self, event: str, **fields: Any) -> None:
        """Append ``{"event": event, **fields}`` and flush it to disk now."""
        if self.path is None:
            return
        with open(self.path, "a") as handle:
            line = {"event": event, "time": round(time.time(), 2), **self.fields, **fields}
            handle.write(json.dumps(line, default=str) + "\n")


EMIT = Events(None)


def guarded(generators: dict[str, "Generator"], mode: str, where: str, work: Any) -> Any:
    """``work()``; when it raises, drop ``mode`` from ``generators`` (the other modes go on), say
    so in a ``mode_failed`` line and return None."""
    try:
        return work()
    except Exception as error:  # noqa: BLE001 - one mode's failure (a missing compiler, say) must not lose the rest
        dropped = generators.pop(mode, None)
        if dropped is not None and dropped.scheduler is not None:
            dropped.scheduler.close()
        EMIT("mode_failed", mode=mode, where=where, error=f"{type(error).__name__}: {error}"[:2000])
        print(f"mode {mode} failed in {where}: {type(error).__name__}: {error}", file=sys.stderr, flush=True)
        return None


# ----------------------------------------------------------------------------- set-up
def load(args: argparse.Namespace) -> tuple[DeepseekVL2, DeepseekVL2Processor, dict[str, Any]]:
    """The model and processor, plus set-up figures (build or load seconds, file read seconds)."""
    dtype = DTYPES[args.dtype]
    if args.checkpoint is None:
        start = time.perf_counter()
        model, processor = build_random_model(args.variant, args.device, dtype, size=args.size, layers=args.layers,
                                              vision_layers=args.vision_layers, seed=args.seed)
        if args.quantize[0] != "none":
            quantize_experts(model, args.quantize[0])
        synchronize(args.device)
        return model, processor, {"random_build_seconds": time.perf_counter() - start}
    files = weight_files(args.checkpoint)
    before, size = read_files_seconds(files)
    start = time.perf_counter()
    model = load_model(args.checkpoint, device=args.device, dtype=dtype, files=files, quantize=args.quantize[0])
    processor = DeepseekVL2Processor.from_pretrained(args.checkpoint)
    synchronize(args.device)
    load_seconds = time.perf_counter() - start
    after, _ = read_files_seconds(files)
    read = min(before, after)  # the read in the page-cache state the load saw
    return model, processor, {"weight_file_bytes": size, "read_seconds": read, "load_seconds": load_seconds,
                              "load_over_read": load_seconds / read if read > 0 else float("inf")}


def synchronize(device: torch.device) -> None:
    """Wait for queued CUDA work so that host clocks measure finished work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_generators(model: DeepseekVL2, processor: DeepseekVL2Processor, args: argparse.Namespace,
                    max_batch: int) -> dict[str, Generator]:
    """One Generator per mode over the same model, each with its own persistent decode state and its
    ``BatchScheduler`` of ``max_batch`` slots (``generator.scheduler``); with several --quantize
    formats, also one per mode over an 8-bit copy (named "MODE+FORMAT")."""
    models = {"": model, **{f"+{fmt}": quantize_experts(copy.deepcopy(model), fmt) for fmt in args.quantize[1:]}}
    generators = {}
    for suffix, each in models.items():
        for mode in args.modes:
            generator = Generator(each, processor, args.prefill_chunk, compile=mode == "compiled",
                                  max_batch=max_batch, max_len=args.max_len)
            BatchScheduler(generator, max_batch=max_batch, max_len=generator.engine.max_len)
            generators[mode + suffix] = generator
    return generators


def prepared(generator: Generator, prompt: str, image: Optional[Image.Image],
             prompt_tokens: Optional[int] = None) -> tuple[ProcessedInputs, float]:
    """``Generator.prepare`` of the prompt (padded with filler words to about ``prompt_tokens``) and its seconds."""
    images = [image] if image is not None else []
    if prompt_tokens:
        base = generator.prepare(prompt, images).input_ids.numel()
        per_word = (generator.prepare(prompt + FILLER * 20, images).input_ids.numel() - base) / 20
        words = max(0, round((prompt_tokens - base) / max(per_word, 1e-9)))
        prompt = prompt + FILLER * words
    start = time.perf_counter()
    inputs = generator.prepare(prompt, images)
    return inputs, time.perf_counter() - start


# ----------------------------------------------------------------------------- one request
SAMPLED = dict(temperature=0.7, top_p=0.9, seed=0)  # the sampled request's parameters


def run_request(generator: Generator, inputs: ProcessedInputs, new_tokens: int, sampled: bool = False
                ) -> dict[str, float]:
    """Generate exactly ``new_tokens`` tokens (eos ignored) through the generator's scheduler: greedy,
    or sampled with :data:`SAMPLED`."""
    params = SamplingParams(**(SAMPLED if sampled else dict(temperature=0.0)), max_new_tokens=new_tokens,
                            ignore_eos=True, stop=())
    stats = generator.scheduler.run(inputs, params).stats
    if stats.new_tokens != new_tokens:
        raise RuntimeError(f"asked for {new_tokens} tokens, got {stats.new_tokens} ({stats.finish_reason})")
    decode = stats.total_seconds - stats.time_to_first_token
    return {"ttft_seconds": stats.time_to_first_token, "total_seconds": stats.total_seconds,
            "decode_tokens_per_second": (new_tokens - 1) / decode if decode > 0 else 0.0}


def alternate(generators: dict[str, Generator], inputs: ProcessedInputs, new_tokens: int,
              repeats: int) -> dict[str, list[dict[str, float]]]:
    """One warm-up request per mode, then ``repeats`` rounds of one timed request per mode (a
    mode that fails is dropped; each timed run is a ``run`` line)."""
    for mode, generator in list(generators.items()):
        guarded(generators, mode, "warm-up request", lambda: run_request(generator, inputs, min(new_tokens, 4)))
    runs: dict[str, list[dict[str, float]]] = {mode: [] for mode in generators}
    for _ in range(repeats):
        for mode, generator in list(generators.items()):
            run = guarded(generators, mode, "timed request", lambda: run_request(generator, inputs, new_tokens))
            if run is None:
                runs.pop(mode, None)
                continue
            runs[mode].append(run)
            EMIT("run", mode=mode, prompt_tokens=int(inputs.input_ids.numel()), new_tokens=new_tokens, **run)
    return runs


def sampled_runs(generators: dict[str, Generator], inputs: ProcessedInputs, new_tokens: int, warm: bool = True
                 ) -> dict[str, dict]:
    """One sampled request per mode (the full sampler: sort over the vocabulary in the step), after
    warming that mode's full step for its KV buckets when ``warm``; ``sampled`` lines."""
    prompt_tokens = int(inputs.input_ids.numel())
    if warm:
        warm_compiled(generators)
    runs = {}
    for mode, generator in list(generators.items()):
        run = guarded(generators, mode, "sampled request", lambda: run_request(generator, inputs, new_tokens, True))
        if run is not None:
            runs[mode] = run
            EMIT("sampled", mode=mode, prompt_tokens=prompt_tokens, new_tokens=new_tokens, **SAMPLED, **run)
    return runs


def median_of(runs: list[dict[str, float]], key: str) -> float:
    """Median of one figure over the timed runs."""
    return statistics.median(run[key] for run in runs)


def warm_compiled(generators: dict[str, Generator], max_seconds: Optional[float] = None) -> dict[str, float]:
    """Warm each compiled mode up once (``Generator.warmup``: every region compiled, on CUDA every
    graph captured; a sealed engine is skipped); a mode whose warm-up fell back to the eager step is
    dropped with a ``mode_failed`` line. Seconds per mode warmed now."""
    seconds = {}
    for mode, generator in list(generators.items()):
        if mode.split("+")[0] != "compiled" or generator.engine.sealed:
            continue
        start = time.perf_counter()

        def work() -> bool:
            generator.warmup(max_seconds=max_seconds)
            if generator.engine.fallback_reason:
                raise RuntimeError(f"the compiled warm-up fell back to eager: {generator.engine.fallback_reason}")
            return True

        if guarded(generators, mode, "warm-up", work):
            seconds[mode] = time.perf_counter() - start
            EMIT("warmup", mode=mode, warmup_seconds=seconds[mode], **generator.engine.warmup_summary)
    return seconds


# ----------------------------------------------------------------------------- bandwidth
def bandwidth(model: DeepseekVL2, decode_tokens_per_second: float, context: float,
              peak_gbs: Optional[float]) -> dict[str, Optional[float]]:
    """Bytes one decoded token reads (activated weights + KV cache at ``context``), and the fraction
    of the memory-bandwidth bound they reach at ``decode_tokens_per_second`` (GPU only)."""
    config, element = model.config.language, model.dtype.itemsize
    step_bytes = activated_parameters(config) * element + kv_cache_bytes_per_position(config, element) * context
    if any(p.element_size() == 1 for p in model.parameters()):  # 8-bit experts: 1 byte per weight
        moe_layers = sum(config.is_moe_layer(i) for i in range(config.num_hidden_layers))
        experts = config.num_experts_per_tok + (config.n_shared_experts or 0)
        step_bytes -= moe_layers * experts * 3 * config.hidden_size * config.moe_intermediate_size * (element - 1)
    achieved = step_bytes * decode_tokens_per_second / 1e9
    return {"bytes_per_token": step_bytes, "achieved_gbs": achieved,
            "bandwidth_fraction": achieved / peak_gbs if peak_gbs else None}


# ----------------------------------------------------------------------------- concurrency
def run_concurrent(generator: Generator, inputs: ProcessedInputs, level: int, new_tokens: int) -> dict[str, float]:
    """``level`` identical greedy requests submitted at once to the generator's scheduler (eos ignored)."""
    scheduler = generator.scheduler
    if level > scheduler.max_batch:
        raise ValueError(f"{level} requests at once need {level} slots; the scheduler has {scheduler.max_batch}")
    prompt_tokens = int(inputs.input_ids.numel())
    params = SamplingParams(temperature=0.0, max_new_tokens=new_tokens, ignore_eos=True, stop=())
    scheduler.run(inputs, SamplingParams(temperature=0.0, max_new_tokens=2, stop=()))  # warm-up
    start = time.perf_counter()
    handles = [scheduler.submit(inputs, params) for _ in range(level)]
    for handle in handles:
        for _ in handle:
            pass
    wall = time.perf_counter() - start
    tokens = sum(handle.stats.new_tokens for handle in handles)
    return {"concurrency": level, "prompt_tokens": prompt_tokens, "wall_seconds": wall,
            "aggregate_tokens_per_second": tokens / wall,
            "ttft_mean_seconds": statistics.mean(h.stats.time_to_first_token for h in handles)}


# ----------------------------------------------------------------------------- target rows
TARGETS = {  # the GPU target table (docs/benchmark.md), batch 1, bfloat16, one H100/H200
    "decode": {"tiny": 300.0, "small": 150.0, "base": 100.0},
    "ttft": {"tiny": 0.080, "base": 0.200},
    "e2e_1428": {"small": 1.2},
    "e2e_demo": {"base": 6.0},
    "concurrency": {"tiny": 4.0},
    "prefix": {"tiny": 0.2, "small": 0.2, "base": 0.2},
    "setup": {"tiny": 1.3, "small": 1.3, "base": 1.3},
    "memory": {"base": 80.0, "small": 40.0},
}


def target_rows(model: DeepseekVL2, generators: dict[str, Generator], args: argparse.Namespace,
                main_runs: dict[str, list[dict[str, float]]], main_context: float,
                setup: dict[str, Any]) -> list[dict[str, Any]]:
    """Every row of the GPU target table, each mode's figure side by side."""
    from tools.make_demo_image import draw_pipeline

    variant, scale = args.variant, args.row_new_tokens_scale
    peak = peak_bandwidth_gbs(args.device, args.peak_bandwidth_gbs)
    first = next(iter(generators.values()))
    rows: list[dict[str, Any]] = []

    def row(key: str, label: str, unit: str, better: str, values: dict[str, Any], **extra: Any) -> None:
        rows.append({"key": key, "row": label, "unit": unit, "target": TARGETS[key].get(variant),
                     "better": better, "values": values, **extra})
        EMIT("row", **rows[-1])

    wanted = set(args.rows)
    decode = {m: median_of(r, "decode_tokens_per_second") for m, r in main_runs.items()}
    fractions = {m: bandwidth(model, v, main_context, peak)["bandwidth_fraction"] for m, v in decode.items()}
    if "decode" in wanted:
        row("decode", f"decode tokens/s, batch 1, {main_context - args.new_tokens / 2:.0f} prompt tokens ({variant})",
            "tokens/s", "higher", decode, bandwidth_fraction=fractions)

    if "ttft" in wanted:
        inputs, prepare_s = prepared(first, "What is in this image?", synthetic_image(384, 384))
        warm_compiled(generators)
        ttft = {m: median_of(r, "ttft_seconds") for m, r in alternate(generators, inputs, 2, args.repeats).items()}
        row("ttft", f"time to first token, 1 image (global + 1 tile), short question, "
            f"{inputs.input_ids.numel()} prompt tokens ({variant})", "s", "lower", ttft, prepare_seconds=prepare_s)

    for key, label, image, prompt, tokens, new in (
        ("e2e_1428", "1 image 700x500 (2x2 tiles)", synthetic_image(700, 500), DEFAULT_PROMPT, 1428, 128),
        ("e2e_demo", "the demo prompt + demo.png", draw_pipeline(), "Describe each stage of this <image> in detail",
         None, 500),
    ):
        if key not in wanted:
            continue
        new = max(2, int(new * scale))
        inputs, prepare_s = prepared(first, prompt, image, tokens)
        warm_compiled(generators)
        runs = alternate(generators, inputs, new, 1)
        e2e = {m: prepare_s + r[0]["total_seconds"] for m, r in runs.items()}
        row(key, f"{label}, {inputs.input_ids.numel()} prompt tokens, {new} new tokens, end to end "
            f"incl. processor ({variant})", "s", "lower", e2e, prepare_seconds=prepare_s)

    if "concurrency" in wanted:
        inputs, _ = prepared(first, DEFAULT_PROMPT, synthetic_image(300, 200))
        new = max(2, int(128 * scale))
        ratio, detail = {}, {}
        warm_compiled(generators)
        for mode, generator in list(generators.items()):
            pair = guarded(generators, mode, "concurrency", lambda: (
                run_concurrent(generator, inputs, 1, new), run_concurrent(generator, inputs, args.concurrency, new)))
            if pair is not None:
                one, many = pair
                ratio[mode] = many["aggregate_tokens_per_second"] / one["aggregate_tokens_per_second"]
                detail[mode] = {"one": one, "many": many}
        row("concurrency", f"{args.concurrency} concurrent requests: aggregate tokens/s ÷ one request's "
            f"({new} new tokens each, {variant})", "x", "higher", ratio, detail=detail)

    if "prefix" in wanted:
        new = max(2, int(20 * scale))
        values, detail = {}, {}
        for mode, generator in list(generators.items()):
            figures = guarded(generators, mode, "prefix",
                              lambda: prefix_cache_figures(generator, synthetic_image(640, 480), new))
            if figures is not None:
                values[mode], detail[mode] = figures["ratio"], figures
        row("prefix", f"3-turn conversation (640x480 image in turn 1, ~20-token turns, {new} new tokens): TTFT "
            f"with ÷ without the prefix cache, the larger of turns 2 and 3 ({variant})", "x", "lower", values,
            detail=detail)

    if "setup" in wanted:
        row("setup", "setup from local disk: load ÷ plain read of the weight files", "x", "lower",
            {"load": setup.get("load_over_read")}, note=None if args.checkpoint else "n/a: random weights (no files)")

    if "memory" in wanted:
        memory = {}
        limit = first.token_limit
        for mode, generator in list(generators.items()):
            inputs, _ = prepared(generator, DEFAULT_PROMPT, synthetic_image(700, 500), limit - 8)
            reset_peak_memory(args.device)
            if guarded(generators, mode, "memory", lambda: run_request(generator, inputs, 2)) is not None:
                memory[mode] = peak_memory_bytes(args.device) / 1e9
        row("memory", f"peak memory, {limit}-token context, chunked prefill ({args.prefill_chunk}) ({variant}; "
            f"{'CUDA max allocated' if args.device.type == 'cuda' else 'process peak RSS'})", "GB", "lower", memory)
    return rows


# ----------------------------------------------------------------------------- report
def device_description(device: torch.device) -> str:
    """GPU name, or CPU architecture, core count and torch threads."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, {torch.get_num_threads()} torch threads"


def benchmark(args: argparse.Namespace) -> tuple[Report, dict[str, Any]]:
    """Every measurement of one run: the text report and the JSON-ready results."""
    model, processor, setup = load(args)
    EMIT("setup", variant=args.variant, size=args.size, dtype=args.dtype, device=str(args.device),
         machine=device_description(args.device), torch=torch.__version__, modes=list(args.modes), **setup)
    max_batch = args.concurrency if args.target_rows and "concurrency" in args.rows else 1
    generators = make_generators(model, processor, args, max_batch)
    first = next(iter(generators.values()))
    image = synthetic_image(*args.image) if args.image else None
    inputs, prepare_s = prepared(first, args.prompt, image, args.prompt_tokens)
    warm = warm_compiled(generators, max_seconds=args.warmup_seconds)
    runs = alternate(generators, inputs, args.new_tokens, args.repeats)
    sampled = sampled_runs(generators, inputs, args.new_tokens, args.sampled == "warmed") if args.sampled != "off" else {}
    memory = memory_check(generators, args.quantize[0], args.prefill_chunk)  # before the rows reset the peak
    EMIT("memory", **memory)
    context = inputs.input_ids.numel() + args.new_tokens / 2
    peak = peak_bandwidth_gbs(args.device, args.peak_bandwidth_gbs)

    report = Report()
    report.section(f"DeepSeek-VL2 benchmark — {device_description(args.device)}, torch {torch.__version__}")
    source = str(args.checkpoint) if args.checkpoint else f"random weights, {args.size} shapes"
    layers = f", {model.config.language.num_hidden_layers} LM + {model.config.vision.layers} vision layers"
    report.add("model", "model", f"{args.variant} ({source}{layers}), {args.dtype} on {args.device}")
    report.add("parameters", "parameters", sum(p.numel() for p in model.parameters()))
    for key, value in setup.items():
        report.add(key, key.replace("_", " "), value)
    report.add("prompt_tokens", "prompt tokens", int(inputs.input_ids.numel()))
    report.add("image_tokens", "of which image tokens", int(inputs.images_seq_mask.sum()))
    report.add("prepare_seconds", "processor (Generator.prepare)", prepare_s, "ms", 1e3)
    for mode, seconds in warm.items():
        report.add(f"{mode}_warmup_seconds", f"{mode}: warm-up (compile{' + capture' if args.device.type == 'cuda' else ''})",
                   seconds, "s")
    report.section(f"one request, {args.new_tokens} greedy tokens (eos ignored), {args.repeats} alternating run(s) per mode")
    for mode, mode_runs in runs.items():
        report.add(f"{mode}_ttft_seconds", f"{mode}: time to first token (each run)",
                   [round(r["ttft_seconds"] * 1e3, 1) for r in mode_runs], "ms")
        report.add(f"{mode}_decode_tokens_per_second", f"{mode}: decode speed (each run)",
                   [round(r["decode_tokens_per_second"], 2) for r in mode_runs], "tokens/s")
        figures = bandwidth(generators[mode].model, median_of(mode_runs, "decode_tokens_per_second"), context, peak)
        report.add(f"{mode}_bytes_per_token", f"{mode}: bytes read per decoded token", figures["bytes_per_token"], "MB", 1e-6)
        report.add(f"{mode}_bandwidth_fraction", f"{mode}: fraction of the bandwidth bound",
                   figures["bandwidth_fraction"], "" if peak else "(GPU only)")
    for fmt in args.quantize[1:]:
        for mode in [m for m in args.modes if m in runs and f"{m}+{fmt}" in runs]:  # a failed mode is dropped
            report.add(f"{mode}_{fmt}_over_{args.quantize[0]}_decode", f"{mode}: {fmt} ÷ {args.quantize[0]} decode (medians)",
                       median_of(runs[f"{mode}+{fmt}"], "decode_tokens_per_second")
                       / median_of(runs[mode], "decode_tokens_per_second"), "x")
    for mode, run in sampled.items():
        report.add(f"{mode}_sampled_decode_tokens_per_second", f"{mode}: decode speed, sampled (temperature "
                   f"{SAMPLED['temperature']}, top_p {SAMPLED['top_p']})", round(run["decode_tokens_per_second"], 2),
                   "tokens/s")
    if {"eager", "compiled"} <= set(runs):
        report.add("compiled_over_eager_decode", "compiled ÷ eager decode (medians)",
                   median_of(runs["compiled"], "decode_tokens_per_second") / median_of(runs["eager"], "decode_tokens_per_second"), "x")
        report.add("compiled_over_eager_ttft", "compiled ÷ eager TTFT (medians)",
                   median_of(runs["compiled"], "ttft_seconds") / median_of(runs["eager"], "ttft_seconds"), "x")
    rows = target_rows(model, generators, args, runs, context, setup) if args.target_rows else []
    if rows:
        report.section("GPU target table rows (each mode; compare with docs/benchmark.md)")
        for row in rows:
            shown = ", ".join(f"{m} {Report.format(v)}" for m, v in row["values"].items()) if not row.get("note") else row["note"]
            target = f" (target {'≥' if row['better'] == 'higher' else '≤'} {row['target']})" if row["target"] else ""
            report.add(f"row_{row['key']}", row["row"], shown, row["unit"] + target)
    results = {"peak_bandwidth_gbs": peak, "runs": runs, "sampled": sampled, "warmup_seconds": warm,
               "target_rows": rows, "modes_measured": list(generators), "memory": memory}
    EMIT("done", modes_measured=list(generators))
    for generator in generators.values():
        generator.scheduler.close()
    return report, results


def main(argv: Optional[list[str]] = None) -> int:
    """Run the benchmark and print text (or JSON with --json)."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    EMIT.path = args.jsonl
    EMIT.fields = {"source": "benchmark", "variant": args.variant}
    if args.setup_only:
        figures = setup_only(args, load)
        EMIT("setup_only", **figures["setup"])
        print(json.dumps(figures, indent=2 if not args.json else None, default=str))
        return 0
    report, results = benchmark(args)
    if args.json:
        command = ["-m", "tools.benchmark", *(argv if argv is not None else sys.argv[1:])]
        meta = {"command": shlex.join(command), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                "machine": device_description(args.device), "torch": torch.__version__, "device": str(args.device),
                "dtype": args.dtype, "variant": args.variant, "new_tokens": args.new_tokens}
        print(json.dumps({"meta": meta, **report.values, **results}, indent=2, default=str))
    else:
        print(report.text())
    return 0


if __name__ == "__main__":
    sys.exit(main())

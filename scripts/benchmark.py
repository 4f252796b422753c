"""Benchmark DeepSeek-VL2 inference: setup, time to first token, prefill and decode speed, memory,
concurrent requests and the rows of the performance-targets table.

Random weights of a variant's shape are written to a temporary folder by
``scripts/make_test_checkpoint.py`` (in a child process, so this process's peak memory is the
engine's own), or ``--checkpoint DIR`` is used. The folder is loaded with ``Generator.load`` and
driven with a synthetic image and a prompt. Every timed run is preceded by a warm-up run.

    python scripts/benchmark.py --variant tiny --size reduced --new-tokens 32
    python scripts/benchmark.py --variant small --size real --dtype bfloat16 --json
    python scripts/benchmark.py --variant tiny --concurrency 1,2,4,8
    python scripts/benchmark.py --variant small --size real --layers 8 --target-rows

The decode figures come from exactly ``--new-tokens`` greedy tokens with end-of-sentence
ignored: ``Generator.stream`` always stops at eos, so the benchmark drives the engine's own steps
(``new_sequence``, ``prefill``, ``decode_logits``) and samples each token the way
``Generator.sample`` does (device sampling, one host read of the id, text streaming).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as ``python scripts/benchmark.py``
    sys.path.insert(0, str(REPO_ROOT))

from deepseek_vl2.model.checkpoint import weight_files  # noqa: E402
from deepseek_vl2.model.config import LanguageConfig  # noqa: E402
from deepseek_vl2.engine.generation import DEFAULT_PREFILL_CHUNK, Generator  # noqa: E402
from deepseek_vl2.inputs.processor import ProcessedInputs  # noqa: E402
from deepseek_vl2.engine.sampling import SamplingParams, sample_next, update_seen  # noqa: E402
from deepseek_vl2.engine.scheduler import BatchScheduler  # noqa: E402
from scripts.make_demo_image import draw_pipeline  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
DEFAULT_PEAK_BANDWIDTH_GBS = 3350.0  # H100 SXM HBM3
DEFAULT_PROMPT = "Describe this image in detail."
SHORT_QUESTION = "What is in this image?"
DEMO_PROMPT = "Describe each stage of this <image> in detail"
READ_BLOCK = 16 << 20


# ----------------------------------------------------------------------------- small helpers
def synchronize(device: torch.device) -> None:
    """Wait for queued CUDA work so that host clocks measure finished work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, work: Callable[[], Any]) -> tuple[Any, float]:
    """Run ``work()`` between two synchronised clock reads; returns (its result, seconds)."""
    synchronize(device)
    start = time.perf_counter()
    result = work()
    synchronize(device)
    return result, time.perf_counter() - start


def parse_image_size(text: str) -> Optional[tuple[int, int]]:
    """``"768x384"`` → (768, 384); ``"none"`` → None (text-only prompt)."""
    if text.lower() == "none":
        return None
    width, sep, height = text.lower().partition("x")
    if not sep or not width.isdigit() or not height.isdigit() or int(width) < 1 or int(height) < 1:
        raise argparse.ArgumentTypeError(f"image size must look like 768x384 or none, got {text!r}")
    return int(width), int(height)


def parse_levels(text: str) -> list[int]:
    """``"1,2,4"`` → [1, 2, 4] (positive ints)."""
    try:
        levels = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        message = f"concurrency must be a comma-separated list of ints, got {text!r}"
        raise argparse.ArgumentTypeError(message) from None
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError(f"concurrency levels must be >= 1, got {text!r}")
    return levels


def synthetic_image(width: int, height: int) -> Image.Image:
    """A deterministic RGB picture: colour gradients with a checker pattern (no file needed)."""
    x = torch.linspace(0, 255, width).repeat(height, 1)
    y = torch.linspace(0, 255, height).unsqueeze(1).repeat(1, width)
    checker = ((torch.arange(width) // 48).unsqueeze(0) + (torch.arange(height) // 48).unsqueeze(1)) % 2
    rgb = torch.stack([x, y, 255 - (x + y) / 2 + 40 * checker], dim=-1).clamp(0, 255).to(torch.uint8)
    return Image.fromarray(rgb.numpy(), "RGB")


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def peak_memory_bytes(device: torch.device) -> int:
    """CUDA: max allocated since the last reset; CPU: process peak RSS."""
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else peak_rss_bytes()


def reset_peak_memory(device: torch.device) -> None:
    """Restart CUDA's peak counter (process RSS peaks cannot be reset)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


# ----------------------------------------------------------------------------- bandwidth model
def attention_parameters(config: LanguageConfig) -> int:
    """Weights of one attention block (MHA or MLA), all read at every decode step."""
    d, heads = config.hidden_size, config.num_attention_heads
    if not config.use_mla:
        head_dim = d // heads
        return d * heads * head_dim * 2 + d * config.num_kv_heads * head_dim * 2  # q, o, k, v
    qk_dim = config.qk_nope_head_dim + config.qk_rope_head_dim
    rank = config.kv_lora_rank
    if config.q_lora_rank is None:
        query = d * heads * qk_dim
    else:
        query = d * config.q_lora_rank + config.q_lora_rank + config.q_lora_rank * heads * qk_dim
    latent = d * (rank + config.qk_rope_head_dim) + rank  # kv_a_proj_with_mqa + kv_a_layernorm
    expand = rank * heads * (config.qk_nope_head_dim + config.v_head_dim)  # kv_b_proj
    output = heads * config.v_head_dim * d
    return query + latent + expand + output


def activated_parameters(config: LanguageConfig) -> int:
    """Language-model weights one decoded token reads: one embedding row, every layer's norms and
    attention, dense MLPs, each MoE layer's gate, shared experts and top-k routed experts, the
    final norm and the whole lm_head."""
    d = config.hidden_size
    total = d + d + config.vocab_size * d  # embedding row, final norm, lm_head
    for index in range(config.num_hidden_layers):
        total += 2 * d + attention_parameters(config)
        if config.is_moe_layer(index):
            expert = 3 * d * config.moe_intermediate_size
            total += config.n_routed_experts * d  # gate
            if config.topk_method == "noaux_tc":
                total += config.n_routed_experts  # e_score_correction_bias
            total += (config.n_shared_experts or 0) * expert + config.num_experts_per_tok * expert
        else:
            total += 3 * d * config.intermediate_size
    return total


def kv_cache_bytes_per_position(config: LanguageConfig, element_size: int) -> int:
    """Cache bytes one token position holds over all layers (the latent + rope key for MLA)."""
    if config.use_mla:
        per_layer = config.kv_lora_rank + config.qk_rope_head_dim
    else:
        per_layer = 2 * config.num_kv_heads * (config.hidden_size // config.num_attention_heads)
    return per_layer * config.num_hidden_layers * element_size


# ----------------------------------------------------------------------------- checkpoint and setup
def write_random_checkpoint(args: argparse.Namespace, out_dir: Path) -> Path:
    """Run make_test_checkpoint.py in a child process (its memory stays out of our peak RSS)."""
    command = [sys.executable, str(REPO_ROOT / "scripts" / "make_test_checkpoint.py"), str(out_dir),
               "--variant", args.variant, "--size", args.size, "--dtype", args.dtype,
               "--seed", str(args.seed), "--eos-boost", "0"]  # eos logit 0: sampled runs rarely stop early
    for option, value in (("--layers", args.layers), ("--vision-layers", args.vision_layers)):
        if value is not None:
            command += [option, str(value)]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return out_dir


def read_files_seconds(files: list[Path]) -> tuple[float, int]:
    """Seconds to read every file once from start to end (plain reads), and the bytes read."""
    buffer = bytearray(READ_BLOCK)
    view = memoryview(buffer)
    total = 0
    start = time.perf_counter()
    for path in files:
        with open(path, "rb", buffering=0) as handle:
            while True:
                count = handle.readinto(view)
                if not count:
                    break
                total += count
    return time.perf_counter() - start, total


@dataclass
class SetupTimes:
    """Model load versus plain file reads of the same safetensors files."""

    weight_file_bytes: int
    read_seconds_before_load: float
    read_seconds_after_load: float
    load_seconds: float

    @property
    def read_seconds(self) -> float:
        """The faster read: the one in the same page-cache state the load saw (see README.md)."""
        return min(self.read_seconds_before_load, self.read_seconds_after_load)

    @property
    def load_over_read(self) -> float:
        return self.load_seconds / self.read_seconds if self.read_seconds > 0 else float("inf")


def load_generator(checkpoint: Path, device: torch.device, dtype: torch.dtype, prefill_chunk: int
                   ) -> tuple[Generator, SetupTimes]:
    """Read the weight files, time ``Generator.load``, read them again."""
    files = weight_files(checkpoint)
    before, size = read_files_seconds(files)
    generator, load_seconds = timed(device, lambda: Generator.load(checkpoint, device, dtype, prefill_chunk))
    after, _ = read_files_seconds(files)
    return generator, SetupTimes(size, before, after, load_seconds)


# ----------------------------------------------------------------------------- one request
@dataclass
class RequestTimes:
    """One request driven for an exact number of new tokens (eos ignored)."""

    prompt_tokens: int
    image_tokens: int
    new_tokens: int
    embed_seconds: float  # vision tower + projector + token embedding
    prefill_seconds: float  # embed + language prefill, up to the first token's logits
    first_token_seconds: float  # from new_sequence to the first token id on the host
    decode_seconds: float  # the new_tokens - 1 decode steps after the first token

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.prompt_tokens / self.prefill_seconds

    @property
    def decode_tokens_per_second(self) -> float:
        return (self.new_tokens - 1) / self.decode_seconds if self.decode_seconds > 0 else 0.0

    @property
    def total_seconds(self) -> float:
        return self.first_token_seconds + self.decode_seconds


def _take_token(generator: Generator, seq, logits: torch.Tensor) -> int:
    """Choose, record and stream one token as ``Generator.sample`` does, without its eos stop."""
    token = sample_next(logits, seq.seen, [seq.params], [seq.generator])
    update_seen(seq.seen, token)
    value = int(token[0])  # the one host synchronisation per step
    seq.tokens.append(value)
    seq.streamer.push(value)
    return value


@torch.inference_mode()
def run_exact(generator: Generator, inputs: ProcessedInputs, new_tokens: int) -> RequestTimes:
    """Prefill ``inputs`` and generate exactly ``new_tokens`` greedy tokens, timing each phase."""
    model, device = generator.model, generator.model.device
    prompt_tokens = int(inputs.input_ids.numel())
    if new_tokens < 1 or prompt_tokens + new_tokens > generator.context_length:
        raise ValueError(f"{prompt_tokens} prompt + {new_tokens} new tokens do not fit the "
                         f"{generator.context_length}-token context (and new tokens must be >= 1)")
    synchronize(device)
    start = time.perf_counter()
    seq = generator.new_sequence(inputs, SamplingParams(temperature=0.0, max_new_tokens=new_tokens))
    cache = model.new_cache(1, prompt_tokens + new_tokens)
    seq.embeds = model.embed_inputs(
        inputs.input_ids, inputs.images, inputs.images_seq_mask, inputs.images_spatial_crop
    ).unsqueeze(0)
    synchronize(device)
    embedded = time.perf_counter()
    generator.prefill(seq, cache)
    synchronize(device)
    prefilled = time.perf_counter()
    _take_token(generator, seq, seq.next_logits.unsqueeze(0))
    first = time.perf_counter()
    for _ in range(new_tokens - 1):
        _take_token(generator, seq, generator.decode_logits([seq], cache))
    synchronize(device)
    done = time.perf_counter()
    return RequestTimes(
        prompt_tokens=prompt_tokens,
        image_tokens=int(inputs.images_seq_mask.sum()),
        new_tokens=new_tokens,
        embed_seconds=embedded - start,
        prefill_seconds=prefilled - start,
        first_token_seconds=first - start,
        decode_seconds=done - first,
    )


def stream_ttft(generator: Generator, inputs: ProcessedInputs) -> float:
    """Time to first token as ``Generator.stream`` reports it (from its start, prepare excluded)."""
    for _ in generator.stream(inputs, SamplingParams(temperature=0.0, max_new_tokens=1)):
        pass
    return generator.last_stats.time_to_first_token


def prepare_timed(generator: Generator, prompt: str, images: list[Image.Image]) -> tuple[ProcessedInputs, float]:
    """``Generator.prepare`` (chat template, tiling, tokenizer) and its seconds."""
    start = time.perf_counter()
    inputs = generator.prepare(prompt, images)
    return inputs, time.perf_counter() - start


# ----------------------------------------------------------------------------- concurrency
def run_concurrency(generator: Generator, inputs: ProcessedInputs, levels: list[int], new_tokens: int,
                    temperature: float) -> list[dict[str, Any]]:
    """Submit N identical requests at once to one BatchScheduler (seeds 0..N-1) for each N."""
    prompt_tokens = int(inputs.input_ids.numel())
    scheduler = BatchScheduler(generator, max_batch=max(levels), max_len=prompt_tokens + new_tokens + 1)
    results = []
    try:
        for _ in scheduler.submit(inputs, SamplingParams(temperature=temperature, max_new_tokens=2, seed=0)):
            pass  # warm-up
        for level in levels:
            params = [SamplingParams(temperature=temperature, max_new_tokens=new_tokens, seed=seed)
                      for seed in range(level)]
            start = time.perf_counter()
            handles = [scheduler.submit(inputs, p) for p in params]
            for handle in handles:
                for _ in handle:
                    pass
            wall = time.perf_counter() - start
            stats = [handle.stats for handle in handles]
            tokens = sum(s.new_tokens for s in stats)
            latencies = [s.total_seconds for s in stats]
            ttfts = [s.time_to_first_token for s in stats]
            speeds = [s.tokens_per_second for s in stats]
            results.append({
                "concurrency": level,
                "wall_seconds": wall,
                "new_tokens": tokens,
                "aggregate_tokens_per_second": tokens / wall,
                "latency_mean_seconds": sum(latencies) / level,
                "latency_max_seconds": max(latencies),
                "ttft_mean_seconds": sum(ttfts) / level,
                "ttft_max_seconds": max(ttfts),
                "request_decode_tokens_per_second_mean": sum(speeds) / level,
                "request_decode_tokens_per_second_min": min(speeds),
                "stopped_early": sum(1 for s in stats if s.finish_reason != "length"),
            })
    finally:
        scheduler.close()
    return results


# ----------------------------------------------------------------------------- target rows
def long_context_inputs(generator: Generator, image: Image.Image, context: int) -> ProcessedInputs:
    """One image plus filler text so that the prompt fills ``context - 1`` tokens (or just under)."""
    base = generator.prepare(SHORT_QUESTION, [image]).input_ids.numel()
    probe = 200
    per_word = (generator.prepare(SHORT_QUESTION + " lorem" * probe, [image]).input_ids.numel() - base) / probe
    words = max(0, int((context - 1 - base) / max(per_word, 1e-9)))
    while True:
        inputs = generator.prepare(SHORT_QUESTION + " lorem" * words, [image])
        over = inputs.input_ids.numel() - (context - 1)
        if over <= 0 or words == 0:
            return inputs
        words -= max(1, int(over / max(per_word, 1e-9)))


def target_rows(generator: Generator, variant: str, decode_tokens_per_second: float,
                setup: SetupTimes) -> list[dict[str, Any]]:
    """Measured values for the rows of the README's performance-targets table (no pass/fail)."""
    device = generator.model.device
    rows: list[dict[str, Any]] = [{"row": f"decode tokens/s ({variant}, batch 1)",
                                   "value": decode_tokens_per_second, "unit": "tokens/s"}]

    inputs, prepare_s = prepare_timed(generator, SHORT_QUESTION, [synthetic_image(384, 384)])
    stream_ttft(generator, inputs)  # warm-up of this shape
    ttft = stream_ttft(generator, inputs)
    rows.append({"row": f"TTFT, 1 image (global + 1 tile), short question, {inputs.input_ids.numel()} prompt tokens",
                 "value": ttft, "unit": "s", "with_prepare": ttft + prepare_s})

    for label, prompt, image, new_tokens in (
        ("1 image 1152x768 (3x2 tiles)", DEFAULT_PROMPT, synthetic_image(1152, 768), 128),
        ("demo prompt + demo.png", DEMO_PROMPT, draw_pipeline(), 500),
    ):
        inputs, prepare_s = prepare_timed(generator, prompt, [image])
        run = run_exact(generator, inputs, new_tokens)
        row = f"{variant}, {label}, {run.prompt_tokens} prompt tokens, {new_tokens} new tokens, end to end"
        rows.append({"row": row, "value": prepare_s + run.total_seconds, "unit": "s"})

    rows.append({"row": "setup from local disk: Generator.load ÷ plain read of the weight files",
                 "value": setup.load_over_read, "unit": "x"})

    context = generator.context_length
    inputs = long_context_inputs(generator, synthetic_image(1152, 768), context)
    reset_peak_memory(device)
    run_exact(generator, inputs, 1)
    label = "CUDA max allocated" if device.type == "cuda" else "process peak RSS"
    filled = int(inputs.input_ids.numel()) + 1  # cache positions of a one-new-token run
    rows.append({"row": f"peak memory at a {filled}-token context ({label})",
                 "value": peak_memory_bytes(device) / 2**30, "unit": "GiB"})
    return rows


# ----------------------------------------------------------------------------- report
class Report:
    """Figures in order of measurement: aligned text lines, or one JSON object of SI values.

    JSON holds each value as measured (seconds, bytes, tokens/s); the text shows it times
    ``scale`` in ``unit`` (e.g. seconds × 1000 in ms).
    """

    def __init__(self) -> None:
        self.sections: list[tuple[str, list[tuple[str, Any, str]]]] = []
        self.values: dict[str, Any] = {}

    def section(self, title: str) -> None:
        """Start a titled group of figures."""
        self.sections.append((title, []))

    def add(self, key: str, label: str, value: Any, unit: str = "", scale: float = 1.0) -> None:
        """One figure: ``key: value`` in JSON, ``label  value·scale unit`` in text."""
        shown = value * scale if isinstance(value, (int, float)) and scale != 1.0 else value
        self.sections[-1][1].append((label, shown, unit))
        self.values[key] = value

    @staticmethod
    def _format(value: Any) -> str:
        if isinstance(value, bool) or value is None:
            return "n/a" if value is None else str(value)
        if isinstance(value, int):
            return f"{value:,}"
        if isinstance(value, float):
            if value == 0 or abs(value) >= 100:
                return f"{value:,.1f}"
            return f"{value:.3g}" if abs(value) < 1 else f"{value:.2f}" if abs(value) < 10 else f"{value:.1f}"
        return str(value)

    def text(self) -> str:
        """Aligned lines, one figure per line with its unit."""
        lines = []
        for title, rows in self.sections:
            lines.append(title)
            width = max((len(label) for label, _, _ in rows), default=0) + 2
            for label, value, unit in rows:
                lines.append(f"  {label.ljust(width)}{self._format(value)} {unit}".rstrip())
        return "\n".join(lines)


def device_description(device: torch.device) -> str:
    """GPU name, or CPU architecture, core count and torch threads."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    return f"{cpu}, {os.cpu_count()} CPU cores, {torch.get_num_threads()} torch threads"


# ----------------------------------------------------------------------------- main
def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", choices=("tiny", "small", "base"), default="tiny")
    parser.add_argument("--size", choices=("reduced", "real"), default="reduced",
                        help="reduced: widths ~64 (seconds on a CPU); real: the published shapes")
    parser.add_argument("--layers", type=int, help="shorten the language model to N layers")
    parser.add_argument("--vision-layers", type=int, help="shorten the vision tower to N blocks")
    parser.add_argument("--checkpoint", type=Path, help="benchmark this checkpoint folder instead of random weights")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument("--scratch", type=Path,
                        help="folder for the temporary random checkpoint (default: the system temp folder)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=tuple(DTYPES), help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--image", type=parse_image_size, default=(768, 384), metavar="WxH",
                        help="synthetic image size (768x384 = global view + 2x1 tiles), or none")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT)
    parser.add_argument("--new-tokens", type=int, default=128, help="greedy tokens per timed request (>= 2)")
    parser.add_argument("--prefill-chunk", type=int, default=DEFAULT_PREFILL_CHUNK)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--peak-bandwidth-gbs", type=float, default=DEFAULT_PEAK_BANDWIDTH_GBS,
                        help="GPU memory bandwidth for the decode roofline (default: H100 SXM, 3350 GB/s)")
    parser.add_argument("--concurrency", type=parse_levels, metavar="N1,N2,...",
                        help="also submit N identical requests at once to a BatchScheduler, for each N")
    parser.add_argument("--temperature", type=float, default=0.7,
                        help="sampling temperature of the concurrent requests (0 = greedy)")
    parser.add_argument("--target-rows", action="store_true", help="also print the performance-targets rows")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = parser.parse_args(argv)
    if args.new_tokens < 2:
        parser.error("--new-tokens must be at least 2 (one prefill token + decode steps)")
    args.device = torch.device(args.device)
    args.dtype = args.dtype or ("bfloat16" if args.device.type == "cuda" else "float32")
    return args


def add_request_figures(report: Report, generator: Generator, args: argparse.Namespace) -> RequestTimes:
    """Processor time, TTFT, prefill and decode speed and peak memory of one request."""
    device = generator.model.device
    images = [synthetic_image(*args.image)] if args.image else []
    inputs, _ = prepare_timed(generator, args.prompt, images)
    run_exact(generator, inputs, 2)  # warm-up
    stream_ttft(generator, inputs)  # warm-up
    prepare_seconds = prepare_timed(generator, args.prompt, images)[1]
    ttft = stream_ttft(generator, inputs)
    reset_peak_memory(device)
    run = run_exact(generator, inputs, args.new_tokens)
    peak = peak_memory_bytes(device)

    image_note = f"image {args.image[0]}x{args.image[1]}" if args.image else "no image"
    report.section(f"one request ({image_note}, {args.new_tokens} greedy new tokens, eos ignored)")
    report.add("prompt_tokens", "prompt tokens", run.prompt_tokens)
    report.add("image_tokens", "of which image tokens", run.image_tokens)
    report.add("prepare_seconds", "processor (Generator.prepare)", prepare_seconds, "ms", 1e3)
    report.add("ttft_seconds", "time to first token (from Generator.stream)", ttft, "ms", 1e3)
    report.add("ttft_with_prepare_seconds", "time to first token incl. prepare", ttft + prepare_seconds, "ms", 1e3)
    report.add("embed_seconds", "vision + projector + embedding", run.embed_seconds, "ms", 1e3)
    report.add("prefill_seconds", "prefill (embedding + language model)", run.prefill_seconds, "ms", 1e3)
    report.add("prefill_tokens_per_second", "prefill speed", run.prefill_tokens_per_second, "tokens/s")
    report.add("decode_tokens_per_second", "decode speed", run.decode_tokens_per_second, "tokens/s")
    per_token = run.decode_seconds / (run.new_tokens - 1)
    report.add("decode_seconds_per_token", "decode time per token", per_token, "ms", 1e3)
    report.add("total_seconds", f"request total ({run.new_tokens} tokens)", run.total_seconds, "s")
    memory_label = "peak memory (CUDA max allocated)" if device.type == "cuda" else "peak memory (process RSS)"
    report.add("peak_memory_bytes", memory_label, peak, "GiB", 2**-30)
    return run


def add_bandwidth_figures(report: Report, generator: Generator, run: RequestTimes, peak_gbs: float) -> None:
    """Bytes one decoded token reads, and on a GPU the fraction of the memory-bandwidth bound."""
    model = generator.model
    config, element_size = model.config.language, model.dtype.itemsize
    activated = activated_parameters(config) * element_size
    per_token = run.decode_seconds / (run.new_tokens - 1)
    mean_context = run.prompt_tokens + run.new_tokens / 2
    on_gpu = model.device.type == "cuda"
    report.section("decode bandwidth model (bytes each decoded token reads)")
    report.add("activated_weight_bytes", "activated weights per token", activated, "MB", 1e-6)
    report.add("kv_read_bytes", "KV cache read per token at the mean context",
               kv_cache_bytes_per_position(config, element_size) * mean_context, "MB", 1e-6)
    report.add("effective_weight_bandwidth_gbs", "activated weights ÷ time per token",
               activated / per_token / 1e9, "GB/s")
    report.add("peak_bandwidth_gbs", "assumed peak memory bandwidth", peak_gbs if on_gpu else None,
               "GB/s (--peak-bandwidth-gbs)" if on_gpu else "(GPU only)")
    report.add("bandwidth_fraction", "fraction of the bandwidth bound",
               activated / per_token / (peak_gbs * 1e9) if on_gpu else None)


def add_concurrency_figures(report: Report, results: list[dict[str, Any]], args: argparse.Namespace) -> None:
    """One section per concurrency level."""
    for result in results:
        n = result["concurrency"]
        report.section(f"{n} concurrent request(s) (BatchScheduler, temperature {args.temperature}, "
                       f"{args.new_tokens} new tokens each)")
        report.add(f"c{n}_aggregate_tokens_per_second", "aggregate throughput (new tokens ÷ wall)",
                   result["aggregate_tokens_per_second"], "tokens/s")
        report.add(f"c{n}_latency_mean_seconds", "latency per request, mean", result["latency_mean_seconds"], "s")
        report.add(f"c{n}_latency_max_seconds", "latency per request, max", result["latency_max_seconds"], "s")
        report.add(f"c{n}_ttft_mean_seconds", "time to first token, mean", result["ttft_mean_seconds"], "ms", 1e3)
        report.add(f"c{n}_request_tokens_per_second", "decode speed per request, mean",
                   result["request_decode_tokens_per_second_mean"], "tokens/s")
        report.add(f"c{n}_stopped_early", "requests that stopped before the limit (eos)", result["stopped_early"])


def benchmark(args: argparse.Namespace, checkpoint: Path) -> tuple[Report, list, list]:
    """Every measurement of one run; returns the report, concurrency results and target rows."""
    report = Report()
    report.section(f"DeepSeek-VL2 benchmark — {device_description(args.device)}, torch {torch.__version__}")
    generator, setup = load_generator(checkpoint, args.device, DTYPES[args.dtype], args.prefill_chunk)
    name = generator.variant
    if name == "custom" and args.checkpoint is None:
        name = f"{args.variant} ({args.size})"
    parameters = sum(p.numel() for p in generator.model.parameters())
    report.add("model", "model", f"{name}, {args.dtype} on {args.device}"
               + (f", {checkpoint}" if args.checkpoint else ", random weights"))
    report.add("parameters", "parameters", parameters)
    report.add("weights_bytes", "weights in memory", parameters * generator.model.dtype.itemsize, "GiB", 2**-30)

    report.section("setup")
    report.add("weight_file_bytes", "weight files", setup.weight_file_bytes, "GB", 1e-9)
    report.add("read_seconds", "plain read of the weight files", setup.read_seconds, "s")
    report.add("load_seconds", "Generator.load (model + processor)", setup.load_seconds, "s")
    report.add("load_over_read", "load ÷ read", setup.load_over_read, "x")

    run = add_request_figures(report, generator, args)
    add_bandwidth_figures(report, generator, run, args.peak_bandwidth_gbs)

    concurrency: list[dict[str, Any]] = []
    if args.concurrency:
        images = [synthetic_image(*args.image)] if args.image else []
        inputs = generator.prepare(args.prompt, images)
        concurrency = run_concurrency(generator, inputs, args.concurrency, args.new_tokens, args.temperature)
        add_concurrency_figures(report, concurrency, args)

    rows: list[dict[str, Any]] = []
    if args.target_rows:
        rows = target_rows(generator, name, run.decode_tokens_per_second, setup)
        report.section("performance-target rows (measured; compare with the README table)")
        for index, row in enumerate(rows):
            report.add(f"target_{index}", row["row"], row["value"], row["unit"])
            if "with_prepare" in row:
                report.add(f"target_{index}_with_prepare", "  same, incl. prepare", row["with_prepare"], "s")
    return report, concurrency, rows


def main(argv: Optional[list[str]] = None) -> int:
    """Run the benchmark and print text (or JSON with --json)."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="dsvl2-bench-", dir=args.scratch) as scratch:
        checkpoint = args.checkpoint or write_random_checkpoint(args, Path(scratch) / "checkpoint")
        report, concurrency, rows = benchmark(args, checkpoint)
    if args.json:
        command = ["scripts/benchmark.py", *(argv if argv is not None else sys.argv[1:])]
        meta = {"command": shlex.join(command), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                "machine": device_description(args.device), "torch": torch.__version__,
                "device": str(args.device), "dtype": args.dtype, "new_tokens": args.new_tokens,
                "image": list(args.image) if args.image else None}
        print(json.dumps({"meta": meta, **report.values, "concurrency": concurrency, "target_rows": rows}, indent=2))
    else:
        print(report.text())
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Figures for tools/benchmark.py: the decode bandwidth model, memory and file-read helpers, a
synthetic image, and the text/JSON report."""
from __future__ import annotations

import resource
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch
from PIL import Image

from deepseek_vl2.model.config import LanguageConfig
from deepseek_vl2.weights.memory_plan import plan_memory

READ_BLOCK = 16 << 20
# Peak HBM bandwidth by GPU name (vendor data sheets), for the decode roofline.
PEAK_BANDWIDTH_GBS = {"H200": 4800.0, "H100 NVL": 3900.0, "H100 PCIe": 2000.0, "H100": 3350.0,
                      "A100-SXM4-80GB": 2039.0, "A100": 1555.0}


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


def peak_bandwidth_gbs(device: torch.device, override: Optional[float] = None) -> Optional[float]:
    """The GPU's peak memory bandwidth (override, else looked up by name); None on the CPU or when unknown."""
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((value for key, value in PEAK_BANDWIDTH_GBS.items() if key in name), None)


# ----------------------------------------------------------------------------- memory, files, image
def peak_memory_bytes(device: torch.device) -> int:
    """CUDA: max allocated since the last reset; CPU: this process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def reset_peak_memory(device: torch.device) -> None:
    """Restart CUDA's peak counter (process RSS peaks cannot be reset)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def memory_check(generators: dict[str, Any], fmt: str, prefill_chunk: int) -> dict[str, Any]:
    """The memory plan (deepseek_vl2/weights/memory_plan.py) of this run beside what the allocator
    saw: ``estimate_allocated`` is the plan less the CUDA runtime (outside the allocator), with one
    decode state per generator (each mode holds its own); compare it with ``max_allocated``."""
    first = next(iter(generators.values()))
    model = first.model
    n_params = sum(p.numel() for name, p in model.named_parameters() if not name.endswith("_scale"))
    plan = plan_memory(model.config, fmt, first.engine.slots, n_params, prefill_chunk=prefill_chunk,
                       kv_bucket=first.kv_bucket, graphs=any(g.engine.use_graphs for g in generators.values()),
                       dtype=model.dtype)
    estimate = plan.total - plan.cuda_runtime + (len(generators) - 1) * plan.decode_state
    cuda = model.device.type == "cuda"
    return {"plan": plan.as_dict(), "decode_states": len(generators), "estimate_allocated": estimate,
            "max_allocated": torch.cuda.max_memory_allocated(model.device) if cuda else None,
            "max_reserved": torch.cuda.max_memory_reserved(model.device) if cuda else None}


def read_files_seconds(files: list[Path]) -> tuple[float, int]:
    """Seconds to read every file once from start to end (plain reads), and the bytes read."""
    buffer = bytearray(READ_BLOCK)
    view = memoryview(buffer)
    total = 0
    start = time.perf_counter()
    for path in files:
        with open(path, "rb", buffering=0) as handle:
            while count := handle.readinto(view):
                total += count
    return time.perf_counter() - start, total


def synthetic_image(width: int, height: int) -> Image.Image:
    """A deterministic RGB picture: colour gradients with a checker pattern (no file needed)."""
    x = torch.linspace(0, 255, width).repeat(height, 1)
    y = torch.linspace(0, 255, height).unsqueeze(1).repeat(1, width)
    checker = ((torch.arange(width) // 48).unsqueeze(0) + (torch.arange(height) // 48).unsqueeze(1)) % 2
    rgb = torch.stack([x, y, 255 - (x + y) / 2 + 40 * checker], dim=-1).clamp(0, 255).to(torch.uint8)
    return Image.fromarray(rgb.numpy(), "RGB")


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
    def format(value: Any) -> str:
        """A number with sensible digits; lists joined; None as n/a."""
        if isinstance(value, list):
            return ", ".join(Report.format(v) for v in value)
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
                lines.append(f"  {label.ljust(width)}{self.format(value)} {unit}".rstrip())
        return "\n".join(lines)

"""GPU sizing: which weight format and how many decode slots fit the GPU, from the memory plan.

Every choice is checked against :func:`~.memory_plan.plan_memory` (weights in their format, the
decode state, the CUDA graph pool, the prefill peak, the CUDA runtime). ``auto`` keeps bf16 where
it fits with every slot, else int8; when no format fits every slot, setup serves with the most
slots that fit (int8 for ``auto``), and refuses only when one slot does not fit.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..model.config import DeepseekVL2Config
from ..model.quantization import QUANTIZE_ENV
from .memory_plan import GIB, MemoryPlan, plan_memory, weight_bytes
from .variants import BYTES_PER_PARAM, VARIANT_ENV, VARIANTS

__all__ = ["AUTO_FALLBACK", "QUANTIZE_ENV", "VARIANT_EXPERTS", "fit_memory", "parameters_on_disk"]

log = logging.getLogger(__name__)

AUTO_FALLBACK = "int8"  # the 8-bit format auto picks: it runs on every GPU and the CPU

# (expert parameters, expert output channels) of each published variant, from its config.json
# (LanguageConfig.expert_parameters; tests/model/test_quantization.py checks them).
VARIANT_EXPERTS: dict[str, tuple[int, int]] = {
    "tiny": (2_497_904_640, 2_216_192),
    "small": (14_844_690_432, 8_293_376),
    "base": (25_315_246_080, 12_012_032),
}
FORMAT_WORDS = {"none": "bf16", "int8": "int8 experts", "fp8": "fp8 experts"}


def parameters_on_disk(files: Sequence[Path]) -> int:
    """Parameters in bfloat16 safetensors files, from their sizes (no header read: the loader
    reads each header once, setup no second time). Off by the few KB of each file's header."""
    return sum(Path(f).stat().st_size for f in files) // 2


def fit_memory(setting: str, config: DeepseekVL2Config, n_params: int, free_bytes: Optional[int], *, slots: int,
               prefill_chunk: int, kv_bucket: int, graphs: bool, dtype: torch.dtype = torch.bfloat16,
               name: str = "") -> MemoryPlan:
    """The plan to serve with: the format ``setting`` ($DSVL2_QUANTIZE) resolves to and the slots.

    ``free_bytes``: the GPU's free memory (None without a GPU: ``auto`` is bf16, nothing checked).
    The first format that fits with every slot wins; else the most slots (>= 1) that fit, logged
    with the figures; else RuntimeError naming the memory needed and what would fit.
    """
    def plan(fmt: str, n_slots: int) -> MemoryPlan:
        return plan_memory(config, fmt, n_slots, n_params, prefill_chunk=prefill_chunk, kv_bucket=kv_bucket,
                           graphs=graphs, dtype=dtype)

    formats = ("none", AUTO_FALLBACK) if setting == "auto" else (setting,)
    if free_bytes is None:
        return plan(formats[0], slots)
    for fmt in formats:
        if (full := plan(fmt, slots)).total <= free_bytes:
            log.info("GPU memory: %s of %.1f GiB free", full.summary(), free_bytes / GIB)
            return full
    fmt = formats[-1]  # the smallest weights: the most slots
    fewer = next((p for n in range(slots - 1, 0, -1) if (p := plan(fmt, n)).total <= free_bytes), None)
    if fewer is not None:
        log.warning("GPU memory: %d of the %d slots asked for fit %.1f GiB free (%d slots need %.1f GiB); "
                    "serving %d at once: %s", fewer.slots, slots, free_bytes / GIB, slots, plan(fmt, slots).total / GIB,
                    fewer.slots, fewer.summary())
        return fewer
    one = plan(fmt, 1)
    raise RuntimeError(
        f"{name or config.variant} ({n_params / 1e9:.1f}B parameters, {FORMAT_WORDS[fmt]}) needs "
        f"{one.total / GIB:.1f} GiB of GPU memory to serve one request ({one.summary()}) but only "
        f"{free_bytes / GIB:.1f} GiB is free. " + _advice(one, n_params, free_bytes, config)
    )


def _advice(one: MemoryPlan, n_params: int, free_bytes: int, config: DeepseekVL2Config) -> str:
    """What would fit ``free_bytes``: this model in 8 bits, or the largest smaller variant (its
    weights plus this model's other terms at one slot: about)."""
    others = one.total - one.weights
    hints = []
    if one.fmt == "none":
        experts = config.language.expert_parameters()
        eight_bit = weight_bytes(n_params, *experts, AUTO_FALLBACK, BYTES_PER_PARAM) + others
        if eight_bit <= free_bytes:
            hints.append(f"Set {QUANTIZE_ENV}={AUTO_FALLBACK} (or auto) to keep this model "
                         f"(about {eight_bit / GIB:.0f} GiB).")
    options = [(v, fmt, weight_bytes(int(v.billion_params * 1e9), *VARIANT_EXPERTS[v.short_name], fmt,
                                     BYTES_PER_PARAM) + others)
               for v in VARIANTS.values() for fmt in ("none", AUTO_FALLBACK)]
    smaller = [option for option in options if option[0].billion_params * 1e9 < 0.95 * n_params]
    fitting = [option for option in smaller if option[2] <= free_bytes]
    if fitting:
        variant, fmt, need = max(fitting, key=lambda option: (option[0].billion_params, option[1] == "none"))
        extra = "" if fmt == "none" else f" with {QUANTIZE_ENV}={fmt}"
        hints.append(f"{'Or use' if hints else 'Use'} a smaller variant: set {VARIANT_ENV}={variant.repo_id}{extra} "
                     f"(about {need / GIB:.0f} GiB).")
    if not hints:
        smallest = min(need for _, _, need in options)
        hints.append(f"No DeepSeek-VL2 variant fits this GPU; the smallest needs about {smallest / GIB:.0f} GiB.")
    return " ".join(hints)

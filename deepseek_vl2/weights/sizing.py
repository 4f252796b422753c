"""GPU sizing: how much memory a checkpoint needs, and whether the free memory holds it."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from .variants import BYTES_PER_PARAM, GB, VARIANT_ENV, VARIANTS

# GPU memory estimate: bf16 weights (2 bytes per parameter) plus 10% and 2 GiB for the CUDA
# context, activations of a 512-token prefill chunk, the vision tower and the KV cache.
HEADROOM_FACTOR = 1.10
HEADROOM_BYTES = 2 * 1024**3


def parameters_on_disk(files: Sequence[Path]) -> int:
    """Parameters in bfloat16 safetensors files, from their sizes (no header read: the loader
    reads each header once, setup no second time). Off by the few KB of each file's header."""
    return sum(Path(f).stat().st_size for f in files) // 2


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

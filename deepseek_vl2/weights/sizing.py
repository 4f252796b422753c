"""GPU sizing: how much memory a checkpoint needs in each weight format, and which format fits.

One rule sizes every choice: the weights' bytes plus 10%, plus 2 GiB for the CUDA context,
activations of a 512-token prefill chunk, the vision tower and the KV cache. The weights' bytes
depend on the format (``none``: bf16, 2 bytes per parameter; ``int8``/``fp8``: the routed and
shared experts 1 byte per parameter plus a float32 scale per output channel,
deepseek_vl2/model/quantization.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from ..model.quantization import QUANTIZE_ENV, QUANTIZE_SETTINGS, weight_bytes
from .variants import BYTES_PER_PARAM, GB, VARIANT_ENV, VARIANTS, Variant

HEADROOM_FACTOR = 1.10
HEADROOM_BYTES = 2 * 1024**3

AUTO_FALLBACK = "int8"  # the 8-bit format auto picks: it runs on every GPU and the CPU

# (expert parameters, expert output channels) of each published variant, from its config.json
# (model.quantization.expert_parameters; tests/test_quantization.py checks them).
VARIANT_EXPERTS: dict[str, tuple[int, int]] = {
    "tiny": (2_497_904_640, 2_216_192),
    "small": (14_844_690_432, 8_293_376),
    "base": (25_315_246_080, 12_012_032),
}
FORMAT_WORDS = {"none": "bf16", "int8": "int8 experts", "fp8": "fp8 experts"}


def quantize_setting(value: str = "auto") -> str:
    """A ``DSVL2_QUANTIZE`` value (none | int8 | fp8 | auto; empty: auto), validated and lower-cased."""
    value = value.strip().lower() or "auto"
    if value not in QUANTIZE_SETTINGS:
        raise ValueError(f"{QUANTIZE_ENV} must be one of {', '.join(QUANTIZE_SETTINGS)}, got {value!r}")
    return value


def parameters_on_disk(files: Sequence[Path]) -> int:
    """Parameters in bfloat16 safetensors files, from their sizes (no header read: the loader
    reads each header once, setup no second time). Off by the few KB of each file's header."""
    return sum(Path(f).stat().st_size for f in files) // 2


def gpu_bytes_needed(n_params: float, fmt: str = "none", experts: tuple[int, int] = (0, 0)) -> int:
    """Estimated GPU memory to serve a model of ``n_params`` parameters, ``experts`` = (expert
    parameters, expert output channels) of them, with its experts stored in ``fmt``."""
    if fmt == "none":
        weights = n_params * BYTES_PER_PARAM
    else:
        weights = weight_bytes(int(n_params), experts[0], experts[1], fmt, BYTES_PER_PARAM)
    return int(weights * HEADROOM_FACTOR + HEADROOM_BYTES)


def variant_gpu_bytes(variant: Variant, fmt: str) -> int:
    """:func:`gpu_bytes_needed` for a published variant in ``fmt``."""
    return gpu_bytes_needed(variant.billion_params * 1e9, fmt, VARIANT_EXPERTS[variant.short_name])


def _advice(n_params: int, free_bytes: int, same_model_8bit: int) -> str:
    """What would fit ``free_bytes``: this model in 8 bits, and the largest smaller variant."""
    hints = []
    if same_model_8bit <= free_bytes:
        hints.append(f"Set {QUANTIZE_ENV}={AUTO_FALLBACK} (or auto) to keep this model "
                     f"(about {same_model_8bit / GB:.0f} GB).")
    options = [(v, fmt, variant_gpu_bytes(v, fmt)) for v in VARIANTS.values() for fmt in ("none", AUTO_FALLBACK)]
    smaller = [(v, fmt, need) for v, fmt, need in options if v.billion_params * 1e9 < 0.95 * n_params]
    fitting = [(v, fmt, need) for v, fmt, need in smaller if need <= free_bytes]
    if fitting:
        best = max(fitting, key=lambda option: (option[0].billion_params, option[1] == "none"))
        variant, fmt, need = best
        extra = "" if fmt == "none" else f" with {QUANTIZE_ENV}={fmt}"
        hints.append(f"{'Or use' if hints else 'Use'} a smaller variant: set {VARIANT_ENV}={variant.repo_id}{extra} (about {need / GB:.0f} GB).")
    if not hints:
        smallest = min(need for _, _, need in options)
        hints.append(f"No DeepSeek-VL2 variant fits this GPU; the smallest needs {smallest / GB:.0f} GB.")
    return " ".join(hints)


def choose_weight_format(setting: str, n_params: int, experts: tuple[int, int], free_bytes: Optional[int],
                         name: str) -> str:
    """The weight format ("none", "int8" or "fp8") to load a model in, given $DSVL2_QUANTIZE.

    ``auto`` keeps bf16 where it fits ``free_bytes`` (the GPU's free memory) with room for the
    KV cache, else int8; an explicit format is checked the same way. Raises RuntimeError naming
    what would fit. Without a GPU (``free_bytes`` None) ``auto`` is "none" and nothing is checked.
    """
    if free_bytes is None:
        return "none" if setting == "auto" else setting
    candidates = ("none", AUTO_FALLBACK) if setting == "auto" else (setting,)
    for fmt in candidates:
        if gpu_bytes_needed(n_params, fmt, experts) <= free_bytes:
            return fmt
    needed = gpu_bytes_needed(n_params, candidates[-1], experts)
    same_model_8bit = gpu_bytes_needed(n_params, AUTO_FALLBACK, experts) if experts[0] else needed + 1
    raise RuntimeError(
        f"{name} ({n_params / 1e9:.1f}B parameters, {FORMAT_WORDS[candidates[-1]]}) needs about "
        f"{needed / GB:.0f} GB of GPU memory but only {free_bytes / GB:.1f} GB is free. "
        + _advice(n_params, free_bytes, same_model_8bit)
    )


def check_gpu_memory(n_params: int, free_bytes: int, name: str) -> None:
    """Raise RuntimeError when ``free_bytes`` cannot hold the model in bf16; name what fits."""
    choose_weight_format("none", n_params, (0, 0), free_bytes, name)

"""Checkpoints: the published variants (:mod:`.variants`), where setup finds its weights or
downloads them (:mod:`.resolve`, with URL archives in :mod:`.fetch`), and GPU sizing
(:mod:`.sizing`).

    .venv/bin/python scripts/download_weights.py --variant tiny --dest weights
"""

from .resolve import (ALLOW_PATTERNS, DEFAULT_WEIGHTS_DIR, DOWNLOAD_DIR_ENV, WEIGHTS_ENV, DownloadError,
                      checkpoint_name, download, main, missing_checkpoint_files, resolve_checkpoint, serve_plan)
from .sizing import (HEADROOM_BYTES, HEADROOM_FACTOR, QUANTIZE_ENV, check_gpu_memory, choose_weight_format,
                     gpu_bytes_needed, parameters_on_disk, quantize_setting, variant_gpu_bytes)
from .variants import (BYTES_PER_PARAM, DEFAULT_VARIANT, GB, VARIANT_ENV, VARIANTS, Variant, resolve_variant,
                       variant_for_repo)

__all__ = ["ALLOW_PATTERNS", "BYTES_PER_PARAM", "DEFAULT_VARIANT", "DEFAULT_WEIGHTS_DIR", "DOWNLOAD_DIR_ENV", "GB",
           "HEADROOM_BYTES", "HEADROOM_FACTOR", "QUANTIZE_ENV", "VARIANTS", "VARIANT_ENV", "WEIGHTS_ENV", "DownloadError", "Variant",
           "check_gpu_memory", "checkpoint_name", "choose_weight_format", "download", "gpu_bytes_needed", "main", "missing_checkpoint_files",
           "parameters_on_disk", "quantize_setting", "resolve_checkpoint", "resolve_variant", "serve_plan",
           "variant_for_repo", "variant_gpu_bytes"]

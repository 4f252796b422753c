"""Checkpoints: the published variants (:mod:`.variants`), where setup finds its weights or
downloads them (:mod:`.resolve`, with URL archives in :mod:`.fetch`), and GPU sizing
(:mod:`.memory_plan` counts, :mod:`.sizing` decides).

    .venv/bin/python scripts/download_weights.py --variant tiny --dest weights
"""

from .resolve import (ALLOW_PATTERNS, DEFAULT_WEIGHTS_DIR, DOWNLOAD_DIR_ENV, WEIGHTS_ENV, DownloadError,
                      checkpoint_name, download, main, missing_checkpoint_files, resolve_checkpoint, serve_plan)
from .memory_plan import MemoryPlan, plan_memory
from .sizing import QUANTIZE_ENV, fit_memory, parameters_on_disk
from .variants import (BYTES_PER_PARAM, DEFAULT_VARIANT, GB, VARIANT_ENV, VARIANTS, Variant, resolve_variant,
                       variant_for_repo)

__all__ = ["ALLOW_PATTERNS", "BYTES_PER_PARAM", "DEFAULT_VARIANT", "DEFAULT_WEIGHTS_DIR", "DOWNLOAD_DIR_ENV", "GB",
           "QUANTIZE_ENV", "VARIANTS", "VARIANT_ENV", "WEIGHTS_ENV", "DownloadError", "Variant",
           "MemoryPlan", "checkpoint_name", "download", "fit_memory", "main", "missing_checkpoint_files",
           "parameters_on_disk", "plan_memory", "resolve_checkpoint", "resolve_variant", "serve_plan",
           "variant_for_repo"]

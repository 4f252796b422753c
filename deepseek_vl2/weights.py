"""Checkpoint variants and their download from the Hugging Face Hub.

Only the files inference needs are fetched (configs, tokenizer, safetensors weights and their
index). Downloads resume where they stopped, and show progress bars.

    .venv/bin/python scripts/download_weights.py --variant tiny --dest weights
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Variant:
    """One published model size."""

    short_name: str  # "tiny" / "small" / "base"
    repo_id: str  # Hugging Face repository
    billion_params: float  # total parameters (all experts), from the model card


VARIANTS: dict[str, Variant] = {
    "tiny": Variant("tiny", "deepseek-ai/deepseek-vl2-tiny", 3.37),
    "small": Variant("small", "deepseek-ai/deepseek-vl2-small", 16.1),
    "base": Variant("base", "deepseek-ai/deepseek-vl2", 27.5),
}
DEFAULT_VARIANT = "deepseek-ai/deepseek-vl2"
VARIANT_ENV = "DSVL2_VARIANT"

# Everything Generator.load() reads; nothing else (no README images, no .bin duplicates).
ALLOW_PATTERNS = [
    "config.json",
    "processor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "*.safetensors",
    "model.safetensors.index.json",
]


class DownloadError(RuntimeError):
    """The checkpoint could not be downloaded; the message says why and what to do."""


def resolve_variant(name: str) -> str:
    """Hub repository id for a variant name.

    Accepts a short name (``tiny``, ``small``, ``base``), a repository name without owner
    (``deepseek-vl2-tiny``), or any ``owner/name`` repository id (used as given).
    """
    name = name.strip()
    if name in VARIANTS:
        return VARIANTS[name].repo_id
    for variant in VARIANTS.values():
        if name == variant.repo_id.split("/", 1)[1]:
            return variant.repo_id
    if name.count("/") == 1 and all(name.split("/")):
        return name
    known = ", ".join(list(VARIANTS) + [v.repo_id for v in VARIANTS.values()])
    raise ValueError(f"unknown DeepSeek-VL2 variant {name!r}; use one of: {known}")


def variant_for_repo(repo_id: str) -> Variant | None:
    """The known variant published under ``repo_id``, or None for other repositories."""
    return next((v for v in VARIANTS.values() if v.repo_id == repo_id), None)


def missing_checkpoint_files(path: str | Path) -> list[str]:
    """Names of the files a complete checkpoint in ``path`` lacks (empty when complete).

    Complete means: config.json, processor_config.json, tokenizer.json, and either
    model.safetensors or model.safetensors.index.json with every shard it lists.
    """
    path = Path(path)
    missing = [
        name
        for name in ("config.json", "processor_config.json", "tokenizer.json")
        if not (path / name).is_file()
    ]
    index = path / "model.safetensors.index.json"
    if (path / "model.safetensors").is_file():
        return missing
    if not index.is_file():
        return missing + ["model.safetensors (or model.safetensors.index.json and shards)"]
    try:
        shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
    except (ValueError, KeyError, TypeError):
        return missing + ["a readable model.safetensors.index.json"]
    return missing + [shard for shard in shards if not (path / shard).is_file()]


def download(
    variant: str,
    dest: str | Path,
    *,
    endpoint: str | None = None,
    token: str | None = None,
    etag_timeout: float = 10.0,
) -> Path:
    """Download ``variant`` into the directory ``dest`` and return ``dest``.

    ``variant`` is anything :func:`resolve_variant` accepts. Interrupted downloads resume.
    ``endpoint`` overrides the Hub URL (default: ``HF_ENDPOINT`` or https://huggingface.co);
    ``token`` defaults to ``HF_TOKEN``. Raises :class:`DownloadError` with a clear message when
    the Hub cannot be reached, the repository is missing or gated, or files are still missing.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    repo_id = resolve_variant(variant)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    hub = endpoint or os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    alternatives = (
        "Alternatively put a checkpoint (config.json, processor_config.json, tokenizer files, "
        f"*.safetensors) into {dest} or point COG_WEIGHTS at a directory holding one."
    )
    print(f"downloading {repo_id} from {hub} into {dest} ...", flush=True)
    try:
        snapshot_download(
            repo_id=repo_id,
            local_dir=dest,
            allow_patterns=ALLOW_PATTERNS,
            endpoint=endpoint,
            token=token,
            etag_timeout=etag_timeout,
        )
    except (GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError) as error:
        raise DownloadError(
            f"{repo_id} was not found on {hub} or needs access rights "
            f"(set HF_TOKEN if it is gated): {type(error).__name__}. {alternatives}"
        ) from error
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as error:
        # Connection refused, DNS failure, timeouts and HF_HUB_OFFLINE=1 all end up here.
        raise DownloadError(
            f"could not download {repo_id}: the Hugging Face Hub at {hub} could not be "
            f"reached ({type(error).__name__}: {_first_line(error)}). Check the network, "
            f"HF_ENDPOINT and HF_HUB_OFFLINE. {alternatives}"
        ) from error
    missing = missing_checkpoint_files(dest)
    if missing:
        raise DownloadError(
            f"download of {repo_id} finished but {dest} still lacks: {', '.join(missing)}"
        )
    print(f"{repo_id} is complete in {dest}", flush=True)
    return dest


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else "no details"


def main(argv: list[str] | None = None) -> int:
    """Command line: download one variant; exit status 1 with the reason on failure."""
    parser = argparse.ArgumentParser(description="Download a DeepSeek-VL2 checkpoint.")
    parser.add_argument(
        "--variant",
        default=os.environ.get(VARIANT_ENV, DEFAULT_VARIANT),
        help=f"tiny, small, base or a repo id (default: ${VARIANT_ENV} or {DEFAULT_VARIANT})",
    )
    parser.add_argument("--dest", type=Path, default=Path("weights"), help="target directory")
    parser.add_argument("--endpoint", default=None, help="Hub URL (default: $HF_ENDPOINT)")
    args = parser.parse_args(argv)
    try:
        download(args.variant, args.dest, endpoint=args.endpoint)
    except (DownloadError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0

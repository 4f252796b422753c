"""Where setup finds its checkpoint (or downloads it), and the complete-files check.

``resolve_checkpoint`` takes ``COG_WEIGHTS`` (a local directory, or an http(s) URL of a .tar /
.tar.gz, see :mod:`deepseek_vl2.weights.fetch`), else ``weights/``, downloading the variant named
by ``DSVL2_VARIANT`` from the Hugging Face Hub into it when it holds no complete checkpoint.
Only the files inference needs are fetched; progress is one log line every few seconds.

    .venv/bin/python scripts/download_weights.py --variant tiny --dest weights
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional

from .variants import DEFAULT_VARIANT, GB, VARIANT_ENV, VARIANTS, resolve_variant, variant_for_repo

WEIGHTS_ENV = "COG_WEIGHTS"
DEFAULT_WEIGHTS_DIR = Path(__file__).resolve().parents[2] / "weights"
DOWNLOAD_DIR_ENV = "DSVL2_DOWNLOAD_DIR"  # where URL downloads go (default: weights/)

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


@dataclass(frozen=True)
class WeightsEnvironment:
    """What the environment says about the checkpoint; empty values count as unset.

    The one reader of these variables (every entry point below calls
    :meth:`from_environment` once, when it runs). ``HF_TOKEN`` and ``HF_HUB_OFFLINE`` are read by
    huggingface_hub itself.
    """

    weights: Optional[str]  # COG_WEIGHTS: a checkpoint directory or an http(s) URL of a .tar of one
    variant: Optional[str]  # DSVL2_VARIANT: what to download into an empty weights/ (None: not chosen)
    download_dir: Path  # DSVL2_DOWNLOAD_DIR: where a URL's archive is unpacked
    hub: str  # HF_ENDPOINT, for messages

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] = os.environ) -> "WeightsEnvironment":
        """The variables as ``environ`` has them now."""
        return cls(weights=environ.get(WEIGHTS_ENV) or None, variant=environ.get(VARIANT_ENV) or None,
                   download_dir=Path(environ.get(DOWNLOAD_DIR_ENV) or DEFAULT_WEIGHTS_DIR),
                   hub=environ.get("HF_ENDPOINT") or "https://huggingface.co")


class DownloadError(RuntimeError):
    """The checkpoint could not be downloaded; the message says why and what to do."""


def checkpoint_name(path: str | Path) -> str:
    """The variant name of the checkpoint in ``path`` (its config's shapes, read from config.json;
    the shapes -> name rule lives with the model config, ``DeepseekVL2Config.variant``)."""
    from deepseek_vl2.model.config import load_config

    return load_config(path).variant


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
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.utils import disable_progress_bars

    from deepseek_vl2.weights.fetch import network_errors, watch
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
    hub = endpoint or WeightsEnvironment.from_environment().hub
    alternatives = (
        "Alternatively put a checkpoint (config.json, processor_config.json, tokenizer files, "
        f"*.safetensors) into {dest} or point COG_WEIGHTS at a directory holding one."
    )
    unreachable = (
        f"could not download {repo_id}: the Hugging Face Hub at {hub} could not be reached"
    )
    try:  # one clear answer before anything is downloaded, whatever dest already holds
        info = HfApi(endpoint=endpoint).model_info(
            repo_id, files_metadata=True, token=token, timeout=etag_timeout
        )
    except (GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError) as error:
        raise DownloadError(
            f"{repo_id} was not found on {hub} or needs access rights "
            f"(set HF_TOKEN if it is gated): {type(error).__name__}. {alternatives}"
        ) from error
    except (LocalEntryNotFoundError, HfHubHTTPError, ValueError, *network_errors()) as error:
        # Connection refused, DNS failure, timeouts and HF_HUB_OFFLINE=1 all end up here.
        raise DownloadError(
            f"{unreachable} ({type(error).__name__}: {_first_line(error)}). Check the network, "
            f"HF_ENDPOINT and HF_HUB_OFFLINE. {alternatives}"
        ) from error
    wanted = [f for f in info.siblings or [] if any(fnmatch.fnmatch(f.rfilename, p) for p in ALLOW_PATTERNS)]
    total = sum(f.size or 0 for f in wanted) or None
    print(f"downloading {repo_id} ({len(wanted)} files, "
          f"{total / GB if total else 0:.1f} GB) from {hub} into {dest}", flush=True)
    disable_progress_bars()  # carriage-return bars read badly in a log: one line every few s
    stop = watch(f"downloading {repo_id}", total, lambda: _bytes_under(dest))
    try:
        snapshot_download(
            repo_id=repo_id,
            local_dir=dest,
            allow_patterns=ALLOW_PATTERNS,
            endpoint=endpoint,
            token=token,
            etag_timeout=etag_timeout,
        )
    except (LocalEntryNotFoundError, HfHubHTTPError, *network_errors()) as error:
        raise DownloadError(
            f"{unreachable} during the download ({type(error).__name__}: {_first_line(error)}); "
            f"run again to resume. {alternatives}"
        ) from error
    finally:
        stop()
    missing = missing_checkpoint_files(dest)
    if missing:
        raise DownloadError(
            f"download of {repo_id} finished but {dest} still lacks: {', '.join(missing)}"
        )
    print(f"{repo_id} is complete in {dest}", flush=True)
    return dest


def _bytes_under(path: Path) -> int:
    """Bytes of every file under ``path`` (partial downloads in .cache/ included)."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else "no details"


def resolve_checkpoint(weights: str | None = None) -> Path:
    """The checkpoint directory to load, downloading it when needed.

    ``weights`` (Cog passes ``COG_WEIGHTS``) or the ``COG_WEIGHTS`` variable: a local
    directory in the official layout, or an http(s) URL of a .tar / .tar.gz of one (fetched
    into ``weights/``, or ``DSVL2_DOWNLOAD_DIR``, once). Without it ``weights/`` is used; if that holds no complete
    checkpoint the variant in ``DSVL2_VARIANT`` (default deepseek-ai/deepseek-vl2) is
    downloaded into it. Raises ValueError for an unusable directory, DownloadError when a
    download fails.
    """
    environment = WeightsEnvironment.from_environment()
    explicit = weights or environment.weights
    if explicit:
        text = str(explicit)
        if text.startswith(("http://", "https://")):
            from deepseek_vl2.weights.fetch import FetchError, fetch_checkpoint

            try:
                path = fetch_checkpoint(text, environment.download_dir)
            except FetchError as error:
                raise DownloadError(str(error)) from error
        else:
            path = Path(text)
            if "://" in text or not path.is_dir():
                raise ValueError(
                    f"{WEIGHTS_ENV} must be a local checkpoint directory or an http(s) URL of a "
                    f".tar / .tar.gz of one, got {text!r}"
                )
        missing = missing_checkpoint_files(path)
        if missing:
            raise ValueError(f"checkpoint directory {path} lacks: {', '.join(missing)}")
        return path

    repo_id = resolve_variant(environment.variant or DEFAULT_VARIANT)
    path = DEFAULT_WEIGHTS_DIR
    if not missing_checkpoint_files(path):
        _check_variant_matches(path, repo_id, chosen=environment.variant is not None)
        return path
    return download(repo_id, path)


def _check_variant_matches(path: Path, repo_id: str, chosen: bool) -> None:
    """Refuse a weights/ directory holding another official variant than DSVL2_VARIANT asks (``chosen``: it is set)."""
    if not chosen or variant_for_repo(repo_id) is None:
        return
    wanted, found = repo_id.split("/", 1)[1], checkpoint_name(path)
    if found not in ("custom", wanted):
        raise ValueError(
            f"{path} holds {found} but {VARIANT_ENV} asks for {wanted}: empty {path} to download "
            f"{wanted}, unset {VARIANT_ENV}, or point {WEIGHTS_ENV} at the right directory"
        )


def serve_plan(dest: Path = DEFAULT_WEIGHTS_DIR) -> tuple[bool, str]:
    """What a server started now would load: (fine to start, a line saying what and how big).

    Not fine: no COG_WEIGHTS, no complete checkpoint in ``dest`` and no explicit
    DSVL2_VARIANT, which would download the 55 GB base model without being asked to.
    """
    environment = WeightsEnvironment.from_environment()
    if environment.weights:
        return True, f"weights: {WEIGHTS_ENV}={environment.weights}"
    if not missing_checkpoint_files(dest):
        return True, f"weights: {dest} ({checkpoint_name(dest)})"
    chosen = environment.variant
    if not chosen:
        sizes = ", ".join(f"{k} (about {v.download_bytes / GB:.0f} GB)" for k, v in VARIANTS.items())
        return False, (
            f"{dest} holds no checkpoint and neither {WEIGHTS_ENV} nor {VARIANT_ENV} is set. "
            f"Choose what to download: {VARIANT_ENV}=tiny|small|base ({sizes}), or set "
            f"{WEIGHTS_ENV} to a checkpoint directory or a URL of a .tar of one"
        )
    repo_id = resolve_variant(chosen)
    known = variant_for_repo(repo_id)
    size = f"about {known.download_bytes / GB:.0f} GB" if known else "size unknown"
    return True, f"weights: {dest} is empty; setup will download {repo_id} ({size}) into it"


def main(argv: list[str] | None = None) -> int:
    """Command line: download one variant; exit status 1 with the reason on failure."""
    parser = argparse.ArgumentParser(description="Download a DeepSeek-VL2 checkpoint.")
    parser.add_argument(
        "--variant",
        default=WeightsEnvironment.from_environment().variant or DEFAULT_VARIANT,
        help=f"tiny, small, base or a repo id (default: ${VARIANT_ENV} or {DEFAULT_VARIANT})",
    )
    parser.add_argument("--dest", type=Path, default=DEFAULT_WEIGHTS_DIR, help="target directory")
    parser.add_argument("--endpoint", default=None, help="Hub URL (default: $HF_ENDPOINT)")
    parser.add_argument("--plan", action="store_true",
                        help="only say what a server would load (exit status 2: it would refuse)")
    args = parser.parse_args(argv)
    if args.plan:
        try:
            fine, line = serve_plan(args.dest)
        except ValueError as error:
            fine, line = False, str(error)
        print(line if fine else f"error: {line}", file=sys.stdout if fine else sys.stderr)
        return 0 if fine else 2
    try:
        download(args.variant, args.dest, endpoint=args.endpoint)
    except (DownloadError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0

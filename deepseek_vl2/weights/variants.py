"""The published DeepSeek-VL2 variants: names, Hub repositories, sizes."""

from __future__ import annotations

from dataclasses import dataclass

VARIANT_ENV = "DSVL2_VARIANT"
DEFAULT_VARIANT = "deepseek-ai/deepseek-vl2"
BYTES_PER_PARAM = 2  # bfloat16
GB = 1e9


@dataclass(frozen=True)
class Variant:
    """One published model size."""

    short_name: str  # "tiny" / "small" / "base"
    repo_id: str  # Hugging Face repository
    billion_params: float  # total parameters (all experts), from the model card

    @property
    def name(self) -> str:
        """The repository name without its owner, e.g. ``deepseek-vl2-tiny``."""
        return self.repo_id.split("/", 1)[1]

    @property
    def download_bytes(self) -> int:
        """About how much the download is: bf16 safetensors, 2 bytes per parameter."""
        return int(self.billion_params * 1e9 * BYTES_PER_PARAM)


VARIANTS: dict[str, Variant] = {
    "tiny": Variant("tiny", "deepseek-ai/deepseek-vl2-tiny", 3.37),
    "small": Variant("small", "deepseek-ai/deepseek-vl2-small", 16.1),
    "base": Variant("base", "deepseek-ai/deepseek-vl2", 27.5),
}


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

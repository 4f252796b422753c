"""The fields of a checkpoint's ``processor_config.json`` that inference uses (official defaults)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from deepseek_vl2.model.config import ConfigError

PROCESSOR_CONFIG_FILE = "processor_config.json"
SUPPORTED_SFT_FORMATS = ("deepseek",)


@dataclass(frozen=True)
class ProcessorSettings:
    """The fields of `processor_config.json` that inference uses (official defaults)."""

    candidate_resolutions: tuple[tuple[int, int], ...]
    patch_size: int = 14
    downsample_ratio: int = 2
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    normalize: bool = True
    image_token: str = "<image>"
    pad_token: str = "<｜▁pad▁｜>"
    sft_format: str = "deepseek"

    @property
    def image_size(self) -> int:
        """Side of one tile: the width of the first candidate resolution (384 in practice)."""
        return self.candidate_resolutions[0][0]

    @property
    def fill_color(self) -> tuple[int, ...]:
        """Letter-box colour: the mean as 0–255 integers, truncated (0.5 -> 127)."""
        return tuple(int(m * 255) for m in self.image_mean)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ProcessorSettings":
        """Build from a parsed processor_config.json, validating what inference relies on."""
        raw = data.get("candidate_resolutions")
        if not raw:
            raise ConfigError("processor_config: 'candidate_resolutions' is missing or empty")
        try:
            candidates = tuple((int(w), int(h)) for w, h in raw)
        except (TypeError, ValueError) as exc:
            raise ConfigError(
                f"processor_config: 'candidate_resolutions' must be [width, height] pairs, got {raw!r}"
            ) from exc
        settings = cls(
            candidate_resolutions=candidates,
            patch_size=int(data.get("patch_size", cls.patch_size)),
            downsample_ratio=int(data.get("downsample_ratio", cls.downsample_ratio)),
            image_mean=tuple(float(x) for x in data.get("image_mean", cls.image_mean)),
            image_std=tuple(float(x) for x in data.get("image_std", cls.image_std)),
            normalize=bool(data.get("normalize", cls.normalize)),
            image_token=str(data.get("image_token", cls.image_token)),
            pad_token=str(data.get("pad_token", cls.pad_token)),
            sft_format=str(data.get("sft_format", cls.sft_format)),
        )
        settings.validate()
        return settings

    def validate(self) -> None:
        """Raise ConfigError (a ValueError) when the settings cannot be used for tiling."""
        size = self.image_size
        for w, h in self.candidate_resolutions:
            if w <= 0 or h <= 0 or w % size or h % size:
                raise ConfigError(
                    f"processor_config: candidate resolution [{w}, {h}] is not a positive multiple "
                    f"of the tile size {size} (the first candidate's width)"
                )
        if self.sft_format not in SUPPORTED_SFT_FORMATS:
            raise ConfigError(
                f"processor_config: sft_format {self.sft_format!r} is not supported; "
                f"supported: {', '.join(SUPPORTED_SFT_FORMATS)}"
            )
        if len(self.image_mean) != 3 or len(self.image_std) != 3:
            raise ConfigError("processor_config: image_mean and image_std need 3 values (RGB)")

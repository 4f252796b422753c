"""The ``downsample_mlp_gelu`` projector: 2×2 patch merge, then a GELU MLP into the LM width."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ProjectorConfig


class Projector(nn.Module):
    """Maps vision features [N, g², C] to language-width tokens [N, (g'/r)², n_embed]."""

    def __init__(self, config: ProjectorConfig) -> None:
        super().__init__()
        self.ratio = config.downsample_ratio
        in_dim = config.input_dim * self.ratio * self.ratio
        hidden = config.n_embed * config.mlp_ratio
        layers: list[nn.Module] = [nn.Linear(in_dim, hidden)]
        for _ in range(1, config.depth):
            layers += [nn.GELU(), nn.Linear(hidden, config.n_embed)]
            hidden = config.n_embed
        # Keys match the official checkpoint: layers.0 and layers.2 for depth 2.
        self.layers = nn.Sequential(*layers)

    def merge_patches(self, features: torch.Tensor) -> torch.Tensor:
        """[N, g², C] → [N, ceil(g/r)², C·r²]: zero-pad the grid bottom/right, gather r×r blocks.

        Channel order is channel-major then block offset (c·r² + dy·r + dx), as ``F.unfold`` gives.
        """
        n, tokens, channels = features.shape
        grid = int(round(tokens**0.5))
        x = features.transpose(1, 2).reshape(n, channels, grid, grid)
        pad = (-grid) % self.ratio
        if pad:
            x = F.pad(x, (0, pad, 0, pad))
        x = F.unfold(x, kernel_size=self.ratio, stride=self.ratio)  # [N, C·r², blocks]
        return x.transpose(1, 2)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(self.merge_patches(features))

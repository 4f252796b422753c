"""DeepSeek-VL2: vision tower → projector → 2D tile layout → DeepSeek-V2 language model."""
from __future__ import annotations

from typing import Optional

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from .config import DeepseekVL2Config
from .kv_cache import KVCache, Slots
from .language import LanguageModel
from .moe import Routing
from .projector import Projector
from .vision import build_vision_tower, encode_tiles


class DeepseekVL2(nn.Module):
    """The whole model. Parameter names equal the official checkpoint keys (experts stacked)."""

    def __init__(self, config: DeepseekVL2Config, vision: Optional[VisionTransformer] = None) -> None:
        """``vision``: an already built tower (the loader builds it outside its meta context)."""
        super().__init__()
        self.config = config
        width = config.language.hidden_size
        self.vision = vision if vision is not None else build_vision_tower(config.vision)
        self.projector = Projector(config.projector)
        self.image_newline = nn.Parameter(torch.empty(width))
        self.view_seperator = nn.Parameter(torch.empty(width))  # (sic) official key name
        self.language = LanguageModel(config.language)

    @property
    def device(self) -> torch.device:
        return self.image_newline.device

    @property
    def dtype(self) -> torch.dtype:
        return self.image_newline.dtype

    # ----------------------------------------------------------------------------- images
    def image_features(self, tiles: torch.Tensor) -> torch.Tensor:
        """Tiles [N, 3, 384, 384] → projected tokens [N, g, g, D] (g = 14 for the real models)."""
        features = encode_tiles(self.vision, tiles.to(device=self.device, dtype=self.dtype))
        tokens = self.projector(features)
        grid = int(round(tokens.shape[1] ** 0.5))
        return tokens.view(tokens.shape[0], grid, grid, -1)

    def _with_newlines(self, grid: torch.Tensor) -> torch.Tensor:
        """[rows, cols, D] → [rows·(cols+1), D] with image_newline closing every row."""
        rows = grid.shape[0]
        newline = self.image_newline.view(1, 1, -1).expand(rows, 1, -1)
        return torch.cat((grid, newline), dim=1).reshape(-1, grid.shape[-1])

    def layout_image(self, tiles: torch.Tensor, tiles_across: int, tiles_down: int) -> torch.Tensor:
        """One image's tokens: global grid + newlines, view separator, stitched local grid + newlines.

        ``tiles`` is [1 + across·down, g, g, D], global view first, local tiles row-major.
        """
        global_view, local = tiles[0], tiles[1:]
        g, dim = local.shape[1], local.shape[-1]
        stitched = (
            local.view(tiles_down, tiles_across, g, g, dim)
            .permute(0, 2, 1, 3, 4)
            .reshape(tiles_down * g, tiles_across * g, dim)
        )
        return torch.cat(
            (self._with_newlines(global_view), self.view_seperator.view(1, -1), self._with_newlines(stitched))
        )

    def embed_inputs(
        self,
        input_ids: torch.Tensor,
        images: Optional[torch.Tensor] = None,
        images_seq_mask: Optional[torch.Tensor] = None,
        images_spatial_crop: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Embeddings [T, D] of one sequence with image tokens scattered in at images_seq_mask.

        input_ids [T]; images [n_tiles, 3, 384, 384]; images_seq_mask [T]; images_spatial_crop
        [n_images, 2] of (tiles across, tiles down). Images whose crop is (0, 0) are ignored, as is
        everything image-related when no crop is non-zero (the text-only placeholder tile).
        """
        input_ids = input_ids.to(self.device)
        embeds = self.language.model.embed_tokens(input_ids)
        if images is None or images_spatial_crop is None:
            return embeds
        crops = [(int(a), int(d)) for a, d in images_spatial_crop.tolist() if a > 0 and d > 0]
        if not crops:
            return embeds
        n_tiles = sum(1 + a * d for a, d in crops)
        tiles = self.image_features(images[:n_tiles])
        pieces, start = [], 0
        for across, down in crops:
            count = 1 + across * down
            pieces.append(self.layout_image(tiles[start : start + count], across, down))
            start += count
        image_tokens = torch.cat(pieces)
        mask = images_seq_mask.to(self.device)
        if int(mask.sum()) != image_tokens.shape[0]:
            raise ValueError(
                f"the prompt has {int(mask.sum())} image positions but the images give {image_tokens.shape[0]} tokens"
            )
        embeds = embeds.clone()
        embeds[mask] = image_tokens.to(embeds.dtype)
        return embeds

    # ----------------------------------------------------------------------------- language
    def new_cache(self, max_slots: int, max_len: int) -> KVCache:
        """A KV cache for ``max_slots`` sequences of up to ``max_len`` tokens on the model's device."""
        return KVCache(self.config.language, max_slots, max_len, self.device, self.dtype)

    def forward_embeds(
        self,
        embeds: torch.Tensor,
        positions: torch.Tensor,
        cache: Optional[KVCache] = None,
        slots: Optional[Slots] = None,
        kv_len: Optional[int] = None,
        last_only: bool = False,
        routing: Optional[Routing] = None,
    ) -> torch.Tensor:
        """Logits [B, T, V] (float32) for embeds [B, T, D] at positions [B, T]; [B, 1, V] if last_only.

        ``routing`` (a :class:`~deepseek_vl2.model.moe.Routing`) records or replays the expert
        choice of every MoE layer; None changes nothing.
        """
        hidden = self.language.hidden_states(embeds, positions, cache, slots, kv_len, routing)
        if last_only:
            hidden = hidden[:, -1:]
        return self.language.logits(hidden)

    def forward_tokens(
        self,
        token_ids: torch.Tensor,
        positions: torch.Tensor,
        cache: Optional[KVCache] = None,
        slots: Optional[Slots] = None,
        kv_len: Optional[int] = None,
    ) -> torch.Tensor:
        """Logits [B, T, V] for token ids [B, T] (no images: decode steps)."""
        embeds = self.language.model.embed_tokens(token_ids)
        return self.forward_embeds(embeds, positions, cache, slots, kv_len)

"""SigLIP vision tower: timm's VisionTransformer with the official DeepSeek-VL2 settings.

Inputs are normalised 384×384 tiles; the output is the final LayerNorm applied to every patch
token (27×27 = 729 for patch 14). The checkpoint's attention-pooling head (``attn_pool.*``) is
never used by DeepSeek-VL2, so the tower is built without it and the loader skips those keys.
"""
from __future__ import annotations

from functools import partial

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from .config import VisionConfig


def build_vision_tower(config: VisionConfig) -> VisionTransformer:
    """Create the ViT (no pooling head, no class token) for ``config``; weights are left uninitialised."""
    return VisionTransformer(
        img_size=config.image_size,
        patch_size=config.patch_size,
        embed_dim=config.width,
        depth=config.layers,
        num_heads=config.heads,
        mlp_ratio=config.mlp_ratio,
        qkv_bias=True,
        class_token=False,
        global_pool="",
        num_classes=0,
        weight_init="skip",
        act_layer=partial(nn.GELU, approximate="tanh"),
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
    )


def encode_tiles(tower: VisionTransformer, tiles: torch.Tensor) -> torch.Tensor:
    """Run the tower on tiles [N, 3, H, W] and return patch features [N, grid², width]."""
    return tower.forward_features(tiles)

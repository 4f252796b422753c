"""Configuration of a DeepSeek-VL2 checkpoint, read from the official ``config.json``.

The official files are sparse: a key left at the reference default is simply absent, so every
field here carries the official default (including surprising ones, such as
``q_lora_rank`` defaulting to 1536 and ``topk_method`` defaulting to the misspelt "gready").
Values this implementation cannot run raise :class:`ConfigError` naming the key and the value.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Optional


class ConfigError(ValueError):
    """A config file holds a value this implementation does not support."""


def _build(cls, values: dict[str, Any], where: str):
    """Instantiate dataclass ``cls`` from ``values``, ignoring keys the dataclass does not model."""
    known = {f.name for f in fields(cls)}
    kwargs = {k: v for k, v in values.items() if k in known}
    try:
        return cls(**kwargs)
    except TypeError as err:  # pragma: no cover - only on malformed files
        raise ConfigError(f"{where}: {err}") from err


def _require(where: str, key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(
            f"{where}.{key} = {value!r} is not supported; supported values: {', '.join(map(repr, allowed))}"
        )


@dataclass
class VisionConfig:
    """SigLIP ViT settings (official ``VisionEncoderConfig`` defaults)."""

    model_name: str = "siglip_large_patch16_384"
    image_size: int = 384
    patch_size: int = 16
    width: int = 1024
    layers: int = 24
    heads: int = 16
    mlp_ratio: float = 4.0
    global_pool: str = "map"
    ignore_head: bool = True
    class_token: bool = False
    num_classes: int = 0
    select_layer: int = -1

    def validate(self) -> None:
        where = "vision_config"
        if self.width % self.heads:
            raise ConfigError(f"{where}.width = {self.width} is not divisible by heads = {self.heads}")
        if self.class_token:
            raise ConfigError(f"{where}.class_token = True is not supported (the official models use False)")
        _require(where, "select_layer", self.select_layer, (-1,))


@dataclass
class ProjectorConfig:
    """MLP projector settings (official ``MlpProjectorConfig`` defaults)."""

    projector_type: str = "downsample_mlp_gelu"
    input_dim: int = 1152
    n_embed: int = 2048
    depth: int = 2
    mlp_ratio: int = 1
    downsample_ratio: int = 2
    token_pooling: bool = False

    def validate(self) -> None:
        where = "projector_config"
        _require(where, "projector_type", self.projector_type, ("downsample_mlp_gelu",))
        _require(where, "token_pooling", self.token_pooling, (False,))
        if self.depth < 1:
            raise ConfigError(f"{where}.depth = {self.depth} must be at least 1")


@dataclass
class LanguageConfig:
    """DeepSeek-V2 decoder settings (official ``DeepseekV2Config`` defaults)."""

    vocab_size: int = 102400
    hidden_size: int = 4096
    intermediate_size: int = 11008
    moe_intermediate_size: int = 1407
    num_hidden_layers: int = 30
    num_attention_heads: int = 32
    num_key_value_heads: Optional[int] = 32
    n_shared_experts: Optional[int] = None
    n_routed_experts: Optional[int] = None
    ep_size: int = 1
    routed_scaling_factor: float = 1.0
    kv_lora_rank: Optional[int] = 512
    q_lora_rank: Optional[int] = 1536
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    qk_nope_head_dim: int = 128
    topk_method: str = "gready"
    n_group: Optional[int] = None
    topk_group: Optional[int] = None
    num_experts_per_tok: Optional[int] = None
    moe_layer_freq: int = 1
    first_k_dense_replace: int = 0
    norm_topk_prob: bool = False
    scoring_func: str = "softmax"
    aux_loss_alpha: float = 0.001
    seq_aux: bool = True
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    pad_token_id: Optional[int] = None
    bos_token_id: int = 100000
    eos_token_id: int = 100001
    tie_word_embeddings: bool = False
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None
    attention_bias: bool = False
    attention_dropout: float = 0.0
    use_mla: bool = True

    def validate(self) -> None:
        where = "language_config"
        _require(where, "hidden_act", self.hidden_act, ("silu",))
        _require(where, "scoring_func", self.scoring_func, ("softmax", "sigmoid"))
        if self.n_routed_experts:
            _require(where, "topk_method", self.topk_method, ("greedy", "group_limited_greedy", "noaux_tc"))
            if not self.num_experts_per_tok or self.num_experts_per_tok > self.n_routed_experts:
                raise ConfigError(
                    f"{where}.num_experts_per_tok = {self.num_experts_per_tok!r} must be between 1 and "
                    f"n_routed_experts = {self.n_routed_experts}"
                )
            if self.topk_method != "greedy":
                n_group = self.n_group or 1
                if self.n_routed_experts % n_group:
                    raise ConfigError(f"{where}.n_group = {n_group} does not divide n_routed_experts")
                if not 1 <= (self.topk_group or 1) <= n_group:
                    raise ConfigError(f"{where}.topk_group = {self.topk_group!r} must be in 1..n_group")
        if self.tie_word_embeddings:
            raise ConfigError(f"{where}.tie_word_embeddings = True is not supported (official models use False)")
        if self.attention_bias:
            raise ConfigError(f"{where}.attention_bias = True is not supported (official models use False)")
        if self.use_mla:
            if not self.kv_lora_rank:
                raise ConfigError(f"{where}.kv_lora_rank = {self.kv_lora_rank!r}: MLA needs a positive rank")
            if self.qk_rope_head_dim % 2:
                raise ConfigError(f"{where}.qk_rope_head_dim = {self.qk_rope_head_dim} must be even")
        elif self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"{where}.hidden_size is not divisible by num_attention_heads")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("type", self.rope_scaling.get("rope_type"))
            _require(where, "rope_scaling.type", kind, ("yarn",))
            if self.use_mla is False:
                raise ConfigError(f"{where}.rope_scaling is only supported with MLA (use_mla true)")

    @property
    def num_kv_heads(self) -> int:
        return self.num_key_value_heads or self.num_attention_heads

    def is_moe_layer(self, index: int) -> bool:
        """Whether decoder layer ``index`` uses the MoE block rather than the dense MLP."""
        return bool(self.n_routed_experts) and index >= self.first_k_dense_replace and index % self.moe_layer_freq == 0

    def expert_parameters(self) -> tuple[int, int]:
        """(parameters, output channels) of all routed and shared experts of the decoder."""
        layers = sum(self.is_moe_layer(i) for i in range(self.num_hidden_layers))
        d, i = self.hidden_size, self.moe_intermediate_size
        shared = i * (self.n_shared_experts or 0)
        per_layer_params = (self.n_routed_experts or 0) * 3 * d * i + 3 * d * shared
        per_layer_channels = (self.n_routed_experts or 0) * (2 * i + d) + (2 * shared + d if shared else 0)
        return layers * per_layer_params, layers * per_layer_channels


@dataclass
class DeepseekVL2Config:
    """The whole model: vision, projector, language, and the tiling layout."""

    vision: VisionConfig
    projector: ProjectorConfig
    language: LanguageConfig
    tile_tag: str = "tile_tag"
    global_view_pos: str = "head"

    def validate(self) -> None:
        _require("config", "tile_tag", self.tile_tag, ("2D",))
        _require("config", "global_view_pos", self.global_view_pos, ("head",))
        self.vision.validate()
        self.projector.validate()
        self.language.validate()
        if self.projector.input_dim != self.vision.width:
            raise ConfigError(
                f"projector_config.input_dim = {self.projector.input_dim} differs from vision_config.width = "
                f"{self.vision.width}"
            )
        if self.projector.n_embed != self.language.hidden_size:
            raise ConfigError(
                f"projector_config.n_embed = {self.projector.n_embed} differs from language_config.hidden_size = "
                f"{self.language.hidden_size}"
            )

    @property
    def variant(self) -> str:
        """Name of the official variant these shapes match, or "custom"."""
        lang = self.language
        shapes = {
            (1280, 12, 64): "deepseek-vl2-tiny",
            (2048, 27, 64): "deepseek-vl2-small",
            (2560, 30, 72): "deepseek-vl2",
        }
        return shapes.get((lang.hidden_size, lang.num_hidden_layers, lang.n_routed_experts), "custom")


def config_from_dict(raw: dict[str, Any]) -> DeepseekVL2Config:
    """Build and validate a config from the parsed ``config.json`` mapping."""
    model_type = raw.get("model_type")
    if model_type not in (None, "deepseek_vl_v2"):
        raise ConfigError(f"config.model_type = {model_type!r} is not supported; expected 'deepseek_vl_v2'")
    config = DeepseekVL2Config(
        vision=_build(VisionConfig, raw.get("vision_config", {}), "vision_config"),
        projector=_build(ProjectorConfig, raw.get("projector_config", {}), "projector_config"),
        language=_build(LanguageConfig, raw.get("language_config", {}), "language_config"),
        tile_tag=raw.get("tile_tag", "tile_tag"),
        global_view_pos=raw.get("global_view_pos", "head"),
    )
    config.validate()
    return config


def load_config(checkpoint_dir: str | Path) -> DeepseekVL2Config:
    """Read ``config.json`` from a checkpoint directory."""
    path = Path(checkpoint_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no config.json in {checkpoint_dir}: is this a DeepSeek-VL2 checkpoint directory?")
    return config_from_dict(json.loads(path.read_text()))

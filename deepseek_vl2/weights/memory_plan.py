"""GPU memory of a served model, counted from its config: what setup and serving allocate.

:func:`plan_memory` adds five terms, each from shapes (nothing is allocated):

* weights in their format (bf16, or int8/fp8 experts: :func:`weight_bytes`);
* the decode state: every buffer ``DecodeState.allocate`` (engine/decode.py) makes for
  ``slots`` requests of ``max_len`` tokens, the KV cache holding ``max_len + 1`` positions;
* the CUDA graph pool: the outputs every captured decode graph keeps, plus one step's temporaries;
* the prefill peak: the larger of the vision tower on the most tiles a request can bring and the
  last prefill chunk through one language-model layer;
* the CUDA runtime beside PyTorch's allocator (a fixed figure, see :data:`CUDA_RUNTIME_BYTES`).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from ..model.config import DeepseekVL2Config, LanguageConfig

GIB = 1024**3
# The CUDA context (about 0.5 GiB on an H100 with lazy module loading), cuBLAS workspaces and the
# kernels loaded on first use: memory the driver holds outside PyTorch's allocator. Setup reads
# the free memory after the context exists, so there this figure is conservative by its size.
CUDA_RUNTIME_BYTES = 1 * GIB
MAX_IMAGES = 4  # the predictor's image inputs (serving/inputs.py IMAGE_INPUTS)
MAX_LOCAL_TILES = 9  # the largest official candidate resolution covers 9 tiles of 384 x 384
TILED_IMAGES = 2  # with more images than this, every image gets one local tile (the official rule)
SAMPLING_COLUMN_BYTES = 4 + 4 + 8 + 4 + 1 + 1  # RowColumns per row: penalty, temperature, top_k, top_p, 2 flags
MODES = 2  # decode graphs are captured for the greedy and the full sampler
FLOAT32, INT64 = 4, 8


@dataclass(frozen=True)
class MemoryPlan:
    """The GPU bytes of one way to serve a model: ``fmt`` weights and ``slots`` decode slots."""

    fmt: str
    slots: int
    weights: int
    decode_state: int
    graph_pool: int
    prefill_peak: int
    cuda_runtime: int

    @property
    def total(self) -> int:
        """Every term together: the GPU memory this way of serving needs."""
        return self.weights + self.decode_state + self.graph_pool + self.prefill_peak + self.cuda_runtime

    def summary(self) -> str:
        """One line: each term and the total, in GiB."""
        def gib(n: int) -> str:
            return f"{n / GIB:.2f}"
        return (f"weights {gib(self.weights)} + decode state {gib(self.decode_state)} ({self.slots} slot(s)) "
                f"+ CUDA graphs {gib(self.graph_pool)} + prefill peak {gib(self.prefill_peak)} "
                f"+ CUDA runtime {gib(self.cuda_runtime)} = {gib(self.total)} GiB")

    def as_dict(self) -> dict[str, object]:
        """The terms and the total, for JSON reports."""
        return {**asdict(self), "total": self.total}


def decode_state_bytes(language: LanguageConfig, slots: int, max_len: int, dtype_bytes: int) -> int:
    """Bytes of every buffer of the decode state for ``slots`` requests of up to ``max_len`` tokens."""
    positions = max_len + 1  # the extra column is where idle rows write
    if language.use_mla:  # the normalised latent and the shared rope key
        per_position = language.kv_lora_rank + language.qk_rope_head_dim
    else:  # keys and values of every kv head
        per_position = 2 * language.num_kv_heads * (language.hidden_size // language.num_attention_heads)
    cache = language.num_hidden_layers * slots * positions * per_position * dtype_bytes
    rows = slots * (INT64 + INT64 + language.vocab_size + INT64 + 1 + SAMPLING_COLUMN_BYTES)  # tokens, positions,
    return cache + rows + max_len * INT64  # seen, uniforms, active, columns; key_positions arange(max_len)


def kv_lengths(max_len: int, kv_bucket: int) -> list[int]:
    """Every KV length a decode step is captured at: multiples of ``kv_bucket``, the last clipped."""
    return sorted({min(kv, max_len) for kv in range(kv_bucket, max_len + kv_bucket, kv_bucket)})


def row_buckets(slots: int) -> list[int]:
    """Row counts a decode step is padded to: powers of two below ``slots``, then ``slots``."""
    sizes, size = [], 1
    while size < slots:
        sizes.append(size)
        size *= 2
    return sizes + [slots]


def graph_pool_bytes(language: LanguageConfig, slots: int, max_len: int, kv_bucket: int, dtype_bytes: int) -> int:
    """The CUDA graph pool after the warm-up captured every (rows, kv_len, mode) decode step."""
    vocab = language.vocab_size
    # Each graph keeps its outputs alive: float32 logits [rows, V] and token ids [rows].
    kept = MODES * len(kv_lengths(max_len, kv_bucket)) * sum(row_buckets(slots)) * (vocab * FLOAT32 + INT64)
    # One step's temporaries, shared by the captures (freed before the next): the full sampler's
    # vocabulary-wide buffers (penalised, scaled, sorted values, int64 sorted ids, probabilities,
    # cumulative sums: at most 8 float32 words per logit) and two float32 attention score rows per head.
    step = 8 * slots * vocab * FLOAT32 + 2 * slots * language.num_attention_heads * max_len * FLOAT32
    if not language.use_mla:  # plain attention may copy the cached keys and values it reads
        step += 2 * slots * max_len * language.hidden_size * dtype_bytes
    return kept + step


def vision_tiles(max_images: int = MAX_IMAGES) -> int:
    """Most tiles one request sends through the vision tower: a global view per image plus its
    local tiles (up to :data:`MAX_LOCAL_TILES` each for two images or fewer, one each beyond)."""
    return max(n * (1 + (MAX_LOCAL_TILES if n <= TILED_IMAGES else 1)) for n in range(1, max_images + 1))


def vision_peak_bytes(config: DeepseekVL2Config, dtype_bytes: int) -> int:
    """The vision tower and projector on :func:`vision_tiles` tiles, and the prompt's embeddings."""
    vision, tiles = config.vision, vision_tiles()
    side = config.vision.image_size // config.vision.patch_size
    tokens, width, mlp = tiles * side * side, vision.width, int(vision.width * vision.mlp_ratio)
    pixels = tiles * 3 * vision.image_size**2 * dtype_bytes
    # One block at a time: the residual and its LayerNorm, then the larger of attention (qkv,
    # the fused SDPA output — no score matrix: no mask, head dim 72 — and its reshaped copy)
    # and the MLP (fc1 output, its GELU, fc2 output).
    block = tokens * dtype_bytes * (2 * width + max(3 * width + 2 * width, 2 * mlp + width))
    merged = tiles * ((side + 1) // 2) ** 2  # 2 x 2 patches per token after padding to an even grid
    projector = tokens * width * dtype_bytes + merged * (4 * width + 2 * config.language.hidden_size) * dtype_bytes
    # The prompt's embeddings: the token embeddings, their copy with the image rows, the image rows.
    embeds = 3 * config.language.max_position_embeddings * config.language.hidden_size * dtype_bytes
    return pixels + max(block, projector) + embeds


def language_chunk_bytes(language: LanguageConfig, chunk: int, max_len: int, dtype_bytes: int) -> int:
    """The last prefill chunk (``chunk`` tokens attending over all ``max_len``) through one layer."""
    t, s, d, b = min(chunk, max_len), max_len, language.hidden_size, dtype_bytes
    heads = language.num_attention_heads
    held = s * d * b + 2 * t * d * b  # the prompt's embeddings (held until prefill ends), residual + norm
    # SDPA with a causal mask may run its math kernel: scores and softmax [heads, t, s], float32 bound.
    scores = 2 * heads * t * s * FLOAT32
    if language.use_mla:  # the expand path: per-head keys/values from the latent of all s positions
        qk, v = language.qk_nope_head_dim + language.qk_rope_head_dim, language.v_head_dim
        attention = (2 * t * heads * qk + s * heads * (language.qk_nope_head_dim + v)  # q and its concat, kv_b(latent)
                     + s * heads * qk + s * heads * v + t * heads * v) * b + scores  # k concat, v copy, output
    else:  # q, k, v of the chunk, contiguous copies of the cached keys and values, the output
        head_dim = d // heads
        attention = (4 * t * d + 2 * s * language.num_kv_heads * head_dim) * b + scores
    k, inter = language.num_experts_per_tok, language.moe_intermediate_size
    shared = inter * (language.n_shared_experts or 0)
    # Grouped experts: gathered tokens, their outputs, the unsorted copy; float32 weighting of the
    # t x k outputs; one expert's [t, 2I] projection and SwiGLU, its weights widened from 8 bits;
    # the shared experts' [t, 2I_s] and SwiGLU.
    moe = (3 * t * k * d * b + 2 * t * k * d * FLOAT32 + 2 * t * 2 * inter * b + 3 * inter * d * b
           + 2 * t * 2 * shared * b)
    dense = 3 * t * language.intermediate_size * b  # the dense first layers: gate, up, their product
    logits = language.vocab_size * FLOAT32  # last_only: one row of float32 logits
    return held + max(attention, moe, dense) + logits


def weight_bytes(n_params: int, experts: int, channels: int, fmt: str, bytes_per_param: int = 2) -> int:
    """Bytes of weights of ``n_params`` parameters, ``experts`` of them expert parameters with
    ``channels`` output channels (``LanguageConfig.expert_parameters``), stored in ``fmt``: "none",
    every parameter at ``bytes_per_param``; "int8"/"fp8", experts one byte each plus a float32
    scale per channel (model/quantization.py)."""
    if fmt == "none":
        return n_params * bytes_per_param
    return (n_params - experts) * bytes_per_param + experts + channels * FLOAT32


def plan_memory(config: DeepseekVL2Config, fmt: str, slots: int, n_params: int, *, prefill_chunk: int,
                kv_bucket: int, graphs: bool, dtype: torch.dtype = torch.bfloat16) -> MemoryPlan:
    """GPU bytes to serve ``config`` (``n_params`` parameters) with experts in ``fmt`` and ``slots``
    decode slots of the model's context; ``graphs``: the decode step is captured as CUDA graphs."""
    language, b = config.language, dtype.itemsize
    max_len = language.max_position_embeddings
    experts, channels = language.expert_parameters()
    return MemoryPlan(
        fmt=fmt,
        slots=slots,
        weights=weight_bytes(n_params, experts, channels, fmt, b),
        decode_state=decode_state_bytes(language, slots, max_len, b),
        graph_pool=graph_pool_bytes(language, slots, max_len, kv_bucket, b) if graphs else 0,
        prefill_peak=max(vision_peak_bytes(config, b), language_chunk_bytes(language, prefill_chunk, max_len, b)),
        cuda_runtime=CUDA_RUNTIME_BYTES,
    )

"""The memory plan (weights/memory_plan.py) against what the engine allocates, and setup's fit
decision (weights/sizing.py): the format, fewer slots, the refusal."""
from __future__ import annotations

import functools
import logging

import pytest
import torch
from torch import nn

from deepseek_vl2.engine.config import DEFAULT_KV_BUCKET, DEFAULT_PREFILL_CHUNK
from deepseek_vl2.engine.decode import DecodeEngine, DecodeState, batch_buckets
from deepseek_vl2.model.config import DeepseekVL2Config, config_from_dict
from deepseek_vl2.model.multimodal import DeepseekVL2
from deepseek_vl2.serving.inputs import IMAGE_INPUTS
from deepseek_vl2.weights import memory_plan
from deepseek_vl2.weights.memory_plan import GIB, decode_state_bytes, plan_memory
from deepseek_vl2.weights.sizing import fit_memory
from deepseek_vl2.weights.variants import VARIANTS
from tools.checkpoints import CANDIDATE_RESOLUTIONS
from tools.random_model import random_config_json

SETTINGS = {"prefill_chunk": DEFAULT_PREFILL_CHUNK, "kv_bucket": DEFAULT_KV_BUCKET, "graphs": True}


@functools.lru_cache(maxsize=None)
def real_config(variant: str) -> DeepseekVL2Config:
    """The published shapes of a variant (config.json as scripts/make_test_checkpoint.py writes it)."""
    return config_from_dict(random_config_json(variant, "real"))


def meta_model(config: DeepseekVL2Config) -> DeepseekVL2:
    """The model on the meta device in bfloat16 (no vision tower: the decode state never uses it)."""
    with torch.device("meta"):
        return DeepseekVL2(config, vision=nn.Identity()).to(torch.bfloat16)


def n_params(variant: str) -> int:
    return int(VARIANTS[variant].billion_params * 1e9)


@pytest.mark.parametrize("slots", [1, 8])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_state_term_is_every_buffer_the_decode_state_allocates(variant: str, slots: int) -> None:
    """Equal to DecodeState.nbytes(), every buffer of the state."""
    config = real_config(variant)
    max_len = config.language.max_position_embeddings
    state = DecodeState.allocate(meta_model(config), slots, max_len)
    assert state.cache.layers[0].first.device.type == "meta"
    counted = decode_state_bytes(config.language, slots, max_len, dtype_bytes=2)
    assert counted == state.nbytes()
    assert plan_memory(config, "none", slots, 1, **SETTINGS).decode_state == counted


def test_tiny_state_at_8_slots_is_the_known_figure() -> None:
    """12 layers x 2 x 10 heads x 128 x 2 bytes x 8 x 4097 positions: the MHA cache, 1.88 GiB."""
    assert decode_state_bytes(real_config("tiny").language, 8, 4096, 2) / GIB == pytest.approx(1.88, abs=0.01)


def test_graph_buckets_are_the_engines() -> None:
    engine = DecodeEngine(meta_model(real_config("base")), slots=6, max_len=1000, compile=False, kv_bucket=256)
    assert memory_plan.kv_lengths(1000, 256) == engine.kv_buckets() == [256, 512, 768, 1000]
    for slots in (1, 2, 5, 8, 16):
        assert memory_plan.row_buckets(slots) == batch_buckets(slots)


def test_image_limits_are_the_predictors() -> None:
    """At most 4 images; the largest candidate resolution holds 9 tiles: 2 images x 10 tiles is the most."""
    assert memory_plan.MAX_IMAGES == len(IMAGE_INPUTS)
    assert memory_plan.MAX_LOCAL_TILES == max(w * h for w, h in CANDIDATE_RESOLUTIONS) // 384**2
    assert memory_plan.vision_tiles() == 20


def test_graph_pool_only_with_graphs_and_grows_with_slots() -> None:
    config = real_config("small")
    eager = plan_memory(config, "none", 8, n_params("small"), **{**SETTINGS, "graphs": False})
    one, eight = (plan_memory(config, "none", n, n_params("small"), **SETTINGS) for n in (1, 8))
    assert eager.graph_pool == 0 and 0 < one.graph_pool < eight.graph_pool
    assert one.weights == eight.weights and one.prefill_peak == eight.prefill_peak
    assert eight.total == sum(eight.as_dict()[k] for k in ("weights", "decode_state", "graph_pool", "prefill_peak",
                                                           "cuda_runtime"))


def test_auto_keeps_bf16_where_every_slot_fits_else_int8() -> None:
    config, params = real_config("base"), n_params("base")
    bf16 = plan_memory(config, "none", 8, params, **SETTINGS)
    assert fit_memory("auto", config, params, bf16.total, slots=8, **SETTINGS) == bf16
    picked = fit_memory("auto", config, params, bf16.total - 1, slots=8, **SETTINGS)
    assert (picked.fmt, picked.slots) == ("int8", 8)
    assert fit_memory("fp8", config, params, 48 * GIB, slots=8, **SETTINGS).fmt == "fp8"
    assert fit_memory("auto", config, params, None, slots=8, **SETTINGS) == bf16  # no GPU: nothing checked


@pytest.mark.parametrize("setting, fmt", [("none", "none"), ("auto", "int8")])
def test_fewer_slots_when_the_model_fits_but_the_slots_do_not(setting: str, fmt: str, caplog) -> None:
    config, params = real_config("tiny"), n_params("tiny")
    three, four = (plan_memory(config, fmt, n, params, **SETTINGS) for n in (3, 4))
    caplog.set_level(logging.INFO, logger="deepseek_vl2")
    picked = fit_memory(setting, config, params, four.total - 1, slots=8, **SETTINGS)
    assert picked == three
    assert "3 of the 8 slots asked for fit" in caplog.text and f"{three.total / GIB:.2f} GiB" in caplog.text


def test_refusal_names_the_memory_needed_and_what_fits() -> None:
    config, params = real_config("base"), n_params("base")
    one = plan_memory(config, "none", 1, params, **SETTINGS)
    with pytest.raises(RuntimeError) as error:
        fit_memory("none", config, params, 45 * 10**9, slots=8, **SETTINGS)
    message = str(error.value)
    assert f"needs {one.total / GIB:.1f} GiB of GPU memory to serve one request" in message
    assert f"only {45e9 / GIB:.1f} GiB is free" in message
    assert "DSVL2_QUANTIZE=int8" in message and VARIANTS["small"].repo_id in message
    with pytest.raises(RuntimeError) as error:  # base in 8 bits needs ~30 GiB: name what fits 24 GB
        fit_memory("auto", config, params, 24 * 10**9, slots=8, **SETTINGS)
    assert f"{VARIANTS['small'].repo_id} with DSVL2_QUANTIZE=int8" in str(error.value)
    with pytest.raises(RuntimeError, match="No DeepSeek-VL2 variant fits"):
        fit_memory("auto", config, params, 4 * 10**9, slots=8, **SETTINGS)

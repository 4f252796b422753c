"""Tests for tools/checkpoints.py: official layout, sharding, tokenizer and config."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from tools.checkpoints import (
    build_plan, main, make_checkpoint, tensor_specs, write_checkpoint)

REPO_ROOT = Path(__file__).resolve().parents[2]
REFERENCE_DIR = Path(os.environ.get("DSVL2_REFERENCE_DIR",
                                    REPO_ROOT.parent / "shared" / "fixtures" / "reference"))
VARIANTS = ("tiny", "small", "base")
# Language-config entries that are sizes rather than structure: taken from a fixture's config so
# that our generator writes the same dimensions; everything else must come from the variant.
DIMENSION_KEYS = (
    "hidden_size", "intermediate_size", "moe_intermediate_size", "num_attention_heads",
    "num_key_value_heads", "num_hidden_layers", "n_routed_experts", "num_experts_per_tok",
    "n_shared_experts", "kv_lora_rank", "q_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
    "v_head_dim", "n_group", "topk_group", "vocab_size")


def fixture_checkpoint(variant: str) -> Path:
    path = REFERENCE_DIR / "checkpoints" / variant
    if not (path / "model.safetensors").is_file():
        pytest.skip(f"reference fixtures not found at {path} (set DSVL2_REFERENCE_DIR)")
    return path


def read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def layout(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """key -> (dtype, shape) of one safetensors file, read from its header only."""
    with safe_open(str(path), "pt") as f:
        return {k: (f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape()))
                for k in f.keys()}


def load_all(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint folder, single file or shards."""
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("model*.safetensors")):
        with safe_open(str(file), "pt") as f:
            for key in f.keys():
                assert key not in tensors, f"{key} stored twice"
                tensors[key] = f.get_tensor(key)
    return tensors


@pytest.fixture(scope="module")
def reduced(tmp_path_factory) -> dict[str, Path]:
    """Default reduced checkpoint of each variant, written once for the module."""
    root = tmp_path_factory.mktemp("reduced")
    return {v: make_checkpoint(root / v, variant=v, seed=3) for v in VARIANTS}


# --------------------------------------------------------------------------- official layout

@pytest.mark.parametrize("variant", VARIANTS)
def test_layout_and_config_match_the_official_fixture(variant, tmp_path):
    fixture = fixture_checkpoint(variant)
    config = read_json(fixture / "config.json")
    dims = {k: v for k, v in config["language_config"].items() if k in DIMENSION_KEYS}
    vision = config["vision_config"]
    out = make_checkpoint(tmp_path / variant, variant=variant, **dims,
                          vision_width=vision["width"], vision_layers=vision["layers"],
                          vision_heads=vision.get("heads", 16))

    assert layout(out / "model.safetensors") == layout(fixture / "model.safetensors")
    # Only sizes were passed in: every structural key and the sparse key set must follow.
    assert read_json(out / "config.json") == config
    for name in ("processor_config.json", "special_tokens_map.json", "tokenizer_config.json"):
        assert read_json(out / name) == read_json(fixture / name), name


def test_config_carries_each_variants_structure(reduced):
    tiny, small, base = (read_json(reduced[v] / "config.json") for v in VARIANTS)
    for config in (tiny, small, base):
        assert config["model_type"] == "deepseek_vl_v2"
        assert config["tile_tag"] == "2D" and config["global_view_pos"] == "head"
        assert len(config["candidate_resolutions"]) == 23
        assert config["language_config"]["model_type"] == "deepseek_v2"
        assert config["projector_config"]["n_embed"] == config["language_config"]["hidden_size"]
    t, s, b = tiny["language_config"], small["language_config"], base["language_config"]
    assert t["use_mla"] is False and t["topk_method"] == "greedy"
    assert "scoring_func" not in t and "norm_topk_prob" not in t
    assert "use_mla" not in s and s["q_lora_rank"] is None and s["kv_lora_rank"] > 0
    assert s["topk_method"] == "greedy" and "scoring_func" not in s
    assert "use_mla" not in b and b["q_lora_rank"] is None
    assert (b["topk_method"], b["scoring_func"]) == ("noaux_tc", "sigmoid")
    assert b["norm_topk_prob"] is True
    assert (b["routed_scaling_factor"], b["n_group"], b["topk_group"]) == (2.0, 1, 1)
    for lang in (t, s, b):
        assert lang["num_hidden_layers"] == 3 and lang["first_k_dense_replace"] == 1
        assert (lang["n_routed_experts"], lang["num_experts_per_tok"]) == (8, 2)


def test_weights_follow_each_variants_structure(reduced):
    keys = {v: set(layout(reduced[v] / "model.safetensors")) for v in VARIANTS}
    layer = "language.model.layers"
    assert f"{layer}.0.self_attn.k_proj.weight" in keys["tiny"]
    assert not any("kv_a_proj" in k for k in keys["tiny"])
    for v in ("small", "base"):
        assert f"{layer}.1.self_attn.q_proj.weight" in keys[v]        # q_lora_rank null
        assert f"{layer}.1.self_attn.kv_b_proj.weight" in keys[v]
        assert not any("q_a_proj" in k or "k_proj" in k for k in keys[v])
    assert not any("e_score_correction_bias" in k for k in keys["tiny"] | keys["small"])
    assert {f"{layer}.{i}.mlp.gate.e_score_correction_bias" for i in (1, 2)} <= keys["base"]
    for v in VARIANTS:
        assert f"{layer}.0.mlp.gate_proj.weight" in keys[v]               # dense first layer
        assert f"{layer}.2.mlp.experts.7.down_proj.weight" in keys[v]
        assert f"{layer}.3.input_layernorm.weight" not in keys[v]
        assert {"vision.attn_pool.latent", "image_newline", "view_seperator",
                "language.lm_head.weight", "projector.layers.2.bias"} <= keys[v]


def test_real_sizes_match_the_published_parameter_counts():
    # Model card totals: Tiny 3.37B, Small 16.1B, DeepSeek-VL2 27.5B (incl. the vision tower).
    expected = {"tiny": 3.37e9, "small": 16.1e9, "base": 27.5e9}
    for variant, total in expected.items():
        plan = build_plan(variant, "real", 129280, torch.bfloat16, 0, {})
        count = sum(s.numel for s in tensor_specs(plan))
        assert abs(count - total) / total < 0.01, (variant, count)
    base = build_plan("base", "real", 129280, torch.bfloat16, 0, {"layers": 2})
    assert base.language["num_hidden_layers"] == 2 and base.language["vocab_size"] == 129280
    full = build_plan("base", "real", 129280, torch.bfloat16, 0, {})
    assert "num_hidden_layers" not in full.language         # 30 is the default, as in the file


# --------------------------------------------------------------------------- weights

def test_shards_cover_every_key_once_and_equal_the_single_file(tmp_path):
    single = make_checkpoint(tmp_path / "one", variant="base", seed=7)
    sharded = make_checkpoint(tmp_path / "three", variant="base", seed=7, shards=3)
    files = sorted(p.name for p in sharded.glob("model*.safetensors"))
    assert files == [f"model-0000{k}-of-00003.safetensors" for k in (1, 2, 3)]
    assert not (sharded / "model.safetensors").exists()
    assert not (single / "model.safetensors.index.json").exists()

    index = read_json(sharded / "model.safetensors.index.json")
    stored = {}
    for name in files:
        for key in layout(sharded / name):
            assert key not in stored, f"{key} in two shards"
            stored[key] = name
    assert index["weight_map"] == stored

    expected, actual = load_all(single), load_all(sharded)
    assert actual.keys() == expected.keys()
    for key, tensor in expected.items():
        assert torch.equal(actual[key], tensor), key
    total = sum(t.numel() * t.element_size() for t in actual.values())
    assert index["metadata"]["total_size"] == total


def test_seed_alone_determines_the_weights(tmp_path):
    a = load_all(make_checkpoint(tmp_path / "a", variant="tiny", seed=1, workers=1))
    b = load_all(make_checkpoint(tmp_path / "b", variant="tiny", seed=1, workers=4))
    c = load_all(make_checkpoint(tmp_path / "c", variant="tiny", seed=2))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not any(torch.equal(a[k], c[k]) for k in a)


def test_weights_are_well_scaled(reduced):
    weights = load_all(reduced["base"])
    assert all(torch.isfinite(t).all() for t in weights.values())
    norms = torch.cat([t for k, t in weights.items() if k.endswith("layernorm.weight")])
    assert abs(norms.mean() - 1) < 0.05 and 0.1 < norms.std() < 0.3
    fc1 = weights["vision.blocks.0.mlp.fc1.weight"]                      # fan_in 64
    assert 0.8 < fc1.std() * math.sqrt(fc1.shape[1]) < 1.2
    embed = weights["language.model.embed_tokens.weight"]
    assert 0.9 < embed.std() < 1.1
    bias = weights["language.model.layers.1.mlp.gate.e_score_correction_bias"]
    assert 0 < bias.abs().max() < 0.5
    biases = torch.cat([t for k, t in weights.items() if k.endswith(".bias")])
    assert 0.03 < biases.std() < 0.07


def test_eos_boost_scales_only_the_eos_row(tmp_path):
    plain = load_all(make_checkpoint(tmp_path / "plain", variant="small", seed=5))
    boosted = load_all(make_checkpoint(tmp_path / "boost", variant="small", seed=5, eos_boost=2.5))
    head, boosted_head = plain["language.lm_head.weight"], boosted["language.lm_head.weight"]
    torch.testing.assert_close(boosted_head[1], head[1] * 2.5)
    assert torch.equal(boosted_head[0], head[0]) and torch.equal(boosted_head[2:], head[2:])


def test_bfloat16_is_the_float32_draw_rounded(tmp_path):
    f32 = load_all(make_checkpoint(tmp_path / "f32", variant="tiny", seed=4))
    bf16_dir = make_checkpoint(tmp_path / "bf16", variant="tiny", seed=4, dtype="bfloat16")
    bf16 = load_all(bf16_dir)
    assert all(t.dtype == torch.bfloat16 for t in bf16.values())
    assert all(torch.equal(bf16[k], f32[k].to(torch.bfloat16)) for k in f32)
    config = read_json(bf16_dir / "config.json")
    assert config["torch_dtype"] == config["language_config"]["torch_dtype"] == "bfloat16"


# --------------------------------------------------------------------------- overrides, CLI

def test_overrides_yarn_and_q_lora(tmp_path):
    out = make_checkpoint(tmp_path / "y", variant="small", layers=2, experts=4,
                          q_lora_rank=16, yarn_factor=4.0)
    lang = read_json(out / "config.json")["language_config"]
    assert lang["rope_scaling"] == {
        "type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096,
        "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707}
    assert lang["max_position_embeddings"] == 16384
    shapes = {k: s for k, (_, s) in layout(out / "model.safetensors").items()}
    assert shapes["language.model.layers.1.self_attn.q_a_proj.weight"] == (16, 64)
    assert shapes["language.model.layers.1.mlp.gate.weight"] == (4, 64)
    assert not any(k.startswith("language.model.layers.2.") for k in shapes)
    with pytest.raises(ValueError, match="unknown override"):
        make_checkpoint(tmp_path / "bad", variant="tiny", hidden_sise=32)
    with pytest.raises(ValueError, match="divisible"):
        make_checkpoint(tmp_path / "bad", variant="tiny", hidden_size=66)


def test_cli_writes_a_sharded_checkpoint(tmp_path, capsys):
    out = tmp_path / "cli"
    assert main([str(out), "--variant", "base", "--shards", "2", "--vision-width", "32",
                 "--set", "q_lora_rank=32", "--set", "n_group=4", "--dtype", "bfloat16"]) == 0
    assert "2 file(s)" in capsys.readouterr().out
    config = read_json(out / "config.json")
    assert config["vision_config"]["width"] == 32 and config["projector_config"]["input_dim"] == 32
    lang = config["language_config"]
    assert (lang["q_lora_rank"], lang["n_group"]) == (32, 4)
    index = read_json(out / "model.safetensors.index.json")
    assert index["weight_map"]["projector.layers.0.weight"].endswith("-of-00002.safetensors")


def test_the_project_loader_accepts_the_checkpoints(reduced, tmp_path):
    from deepseek_vl2.model.checkpoint import load_model

    extra = make_checkpoint(tmp_path / "x", variant="base", shards=2, q_lora_rank=16,
                            n_group=4, topk_group=2, yarn_factor=2.0, dtype="bfloat16")
    for folder in [*reduced.values(), extra]:
        model = load_model(folder, device="cpu", dtype=torch.float32)
        ids = torch.tensor([[0, 1406, 28, 262, 1407]])
        logits = model.forward_tokens(ids, torch.arange(5)[None], None, None)
        assert logits.shape == (1, 5, model.config.language.vocab_size)
        assert torch.isfinite(logits).all() and 0.5 < logits.std() < 10


# --------------------------------------------------------------------------- tokenizer

def test_tokenizer_loads_and_round_trips(reduced):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(reduced["tiny"])
    assert tokenizer.is_fast  # LlamaTokenizerFast in transformers 4, TokenizersBackend in 5
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (0, 1, 2)
    assert tokenizer.convert_ids_to_tokens([0, 1, 2]) == [
        "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"]
    specials = ["<image>", "<|ref|>", "<|/ref|>", "<|det|>", "<|/det|>", "<|grounding|>",
                "<|User|>", "<|Assistant|>"]
    n = len(tokenizer)
    assert 1400 <= n <= 2000
    assert tokenizer.convert_tokens_to_ids(specials) == list(range(n - 8, n))
    vocab_size = read_json(reduced["tiny"] / "config.json")["language_config"]["vocab_size"]
    assert vocab_size > n

    assert tokenizer("hello").input_ids == tokenizer.encode("hello", add_special_tokens=False)
    texts = ["<|User|>: <image>\nDescribe the image.\n\n<|Assistant|>:",
             "<|ref|>the dog<|/ref|><|det|>[[120, 340, 560, 890]]<|/det|>",
             "图片中有一只猫。これは写真です。 Great job 👍 🦙🐉 naïve café 12345"]
    for text in texts:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert tokenizer.decode(ids) == text
    assert tokenizer.encode("<image>", add_special_tokens=False) == [n - 8]

    # Some multi-byte characters must be split over several tokens (streaming has to cope).
    llama = tokenizer.encode("🦙", add_special_tokens=False)
    assert len(llama) > 1 and "\ufffd" in tokenizer.decode(llama[:1])


def test_tokenizer_training_is_deterministic_across_processes(reduced):
    code = ("from tools.checkpoints import build_tokenizer;"
            "import sys; sys.stdout.write(build_tokenizer().to_str())")
    other = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, check=True,
                           capture_output=True, text=True, encoding="utf-8").stdout
    mine = json.loads((reduced["tiny"] / "tokenizer.json").read_text(encoding="utf-8"))
    assert json.loads(other) == mine


def test_write_checkpoint_reports_a_summary(tmp_path):
    summary = write_checkpoint(tmp_path / "s", variant="tiny", vision_layers=1)
    assert summary["files"] == ["model.safetensors"] and summary["tokenizer_len"] >= 1400
    stored = load_all(tmp_path / "s")
    assert summary["tensors"] == len(stored)
    assert summary["parameters"] == sum(t.numel() for t in stored.values())

"""Checkpoint loading: sharded == single file, bfloat16 on CPU, and one clear error per failure kind."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from deepseek_vl2.model.checkpoint import CheckpointError, load_model
from deepseek_vl2.model.config import ConfigError, load_config
from tools.checkpoints import make_checkpoint


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("single"), variant="base", seed=3)


def _logits(path: Path, dtype=torch.float32) -> torch.Tensor:
    model = load_model(path, device="cpu", dtype=dtype)
    ids = torch.tensor([[0, 5, 17, 300, 42, 9, 1001, 77]])
    with torch.inference_mode():
        return model.forward_tokens(ids, torch.arange(ids.shape[1]).unsqueeze(0))


def test_sharded_checkpoint_gives_identical_logits(single: Path, tmp_path: Path) -> None:
    sharded = make_checkpoint(tmp_path / "sharded", variant="base", seed=3, shards=3)
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("model-*-of-*.safetensors"))) == 3
    assert torch.equal(_logits(single), _logits(sharded))


def test_bfloat16_runs_on_cpu_close_to_float32(single: Path) -> None:
    model = load_model(single, device="cpu", dtype=torch.bfloat16)
    assert model.language.lm_head.weight.dtype == torch.bfloat16
    reference, low = _logits(single), _logits(single, torch.bfloat16)
    assert low.dtype == torch.float32 and torch.isfinite(low).all()
    # bf16 keeps ~3 significant digits; random weights amplify it, so only a sanity bound here.
    # The measured drift on the fixture cases is in the README (tools/parity/measure_drift.py).
    assert (low - reference).abs().max() < 0.25 * reference.abs().max()


def test_missing_directory_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_model(missing, device="cpu")


def test_missing_weights_file_is_named(single: Path, tmp_path: Path) -> None:
    copy = tmp_path / "ckpt"
    shutil.copytree(single, copy)
    (copy / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_model(copy, device="cpu")


def _rewrite_weights(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "model.safetensors")
    return dst


def test_missing_and_unexpected_keys_are_listed(single: Path, tmp_path: Path) -> None:
    def edit(t: dict) -> None:
        del t["language.model.layers.1.mlp.experts.3.up_proj.weight"]
        t["language.model.layers.1.mlp.extra.weight"] = torch.zeros(2)

    path = _rewrite_weights(single, tmp_path / "ckpt", edit)
    with pytest.raises(CheckpointError) as info:
        load_model(path, device="cpu")
    message = str(info.value)
    assert "1 missing key(s)" in message and "experts.3.up_proj.weight" in message
    assert "1 unexpected key(s)" in message and "mlp.extra.weight" in message


def test_attention_pool_head_is_skipped_on_purpose(single: Path) -> None:
    keys = load_file(single / "model.safetensors").keys()
    assert any(k.startswith("vision.attn_pool.") for k in keys)
    model = load_model(single, device="cpu")
    assert not any(name.startswith("vision.attn_pool") for name, _ in model.named_parameters())


def test_shape_mismatch_names_key_and_shapes(single: Path, tmp_path: Path) -> None:
    def edit(t: dict) -> None:
        t["projector.layers.2.bias"] = torch.zeros(5)

    path = _rewrite_weights(single, tmp_path / "ckpt", edit)
    with pytest.raises(CheckpointError, match=r"projector\.layers\.2\.bias: checkpoint shape \(5,\)"):
        load_model(path, device="cpu")


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [
        (None, "tile_tag", "1D"),
        ("projector_config", "projector_type", "linear"),
        ("language_config", "topk_method", "magic"),
        ("language_config", "scoring_func", "relu"),
        ("language_config", "hidden_act", "gelu"),
    ],
)
def test_unsupported_config_value_names_key_and_value(single: Path, tmp_path: Path, section, key, value) -> None:
    copy = tmp_path / "ckpt"
    shutil.copytree(single, copy)
    raw = json.loads((copy / "config.json").read_text())
    (raw[section] if section else raw)[key] = value
    (copy / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match=rf"{key} = {value!r}"):
        load_config(copy)


def test_absent_keys_take_official_defaults(single: Path, tmp_path: Path) -> None:
    copy = tmp_path / "ckpt"
    shutil.copytree(single, copy)
    raw = json.loads((copy / "config.json").read_text())
    language = raw["language_config"]
    for key in ("rope_theta", "rms_norm_eps", "routed_scaling_factor"):
        language.pop(key, None)
    (copy / "config.json").write_text(json.dumps(raw))
    config = load_config(copy).language
    assert (config.rope_theta, config.rms_norm_eps, config.routed_scaling_factor) == (10000.0, 1e-6, 1.0)

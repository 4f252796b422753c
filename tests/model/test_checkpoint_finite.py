"""A checkpoint holding NaN or inf is refused at load, before any cast or 8-bit quantization,
with the tensor's name and file — in every weight format, and at setup."""
from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from deepseek_vl2.model.checkpoint import CheckpointError, check_finite, load_model
from deepseek_vl2.serving.service import Service
from tools.checkpoints import make_checkpoint

DENSE = "language.model.layers.0.mlp.up_proj.weight"
ROUTED_EXPERT = "language.model.layers.1.mlp.experts.3.down_proj.weight"
SHARED_EXPERT = "language.model.layers.1.mlp.shared_experts.gate_proj.weight"
BAD_VALUES = {"nan": math.nan, "+inf": math.inf, "-inf": -math.inf}


@pytest.fixture(scope="module")
def sharded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("finite"), variant="tiny", seed=5, shards=3)


def _file_holding(checkpoint: Path, key: str) -> Path:
    for path in sorted(checkpoint.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            if key in handle.keys():
                return path
    raise AssertionError(f"{key} is in no file of {checkpoint}")


def _with_value(src: Path, dst: Path, key: str, value: float) -> Path:
    """A copy of checkpoint ``src`` with one element of ``key`` set to ``value``; returns its file."""
    shutil.copytree(src, dst)
    path = _file_holding(dst, key)
    tensors = load_file(path)
    tensors[key][2, 1] = value
    save_file(tensors, path, metadata={"format": "pt"})
    return path


@pytest.mark.parametrize("quantize", ["none", "int8", "fp8"])
@pytest.mark.parametrize("key", [DENSE, ROUTED_EXPERT, SHARED_EXPERT])
@pytest.mark.parametrize("kind", list(BAD_VALUES))
def test_non_finite_weight_is_refused_with_its_name_and_file(
    sharded: Path, tmp_path: Path, kind: str, key: str, quantize: str
) -> None:
    bad_file = _with_value(sharded, tmp_path / "ckpt", key, BAD_VALUES[kind])
    with pytest.raises(CheckpointError) as info:
        load_model(tmp_path / "ckpt", device="cpu", dtype=torch.float32, quantize=quantize)
    message = str(info.value)
    assert key in message and bad_file.name in message
    counts = {"nan": "1 NaN, 0 +inf, 0 -inf", "+inf": "0 NaN, 1 +inf, 0 -inf", "-inf": "0 NaN, 0 +inf, 1 -inf"}
    assert counts[kind] in message and "index [2, 1]" in message


def test_bfloat16_file_with_nan_is_refused(tmp_path: Path) -> None:
    checkpoint = make_checkpoint(tmp_path / "bf16", variant="tiny", seed=5, dtype=torch.bfloat16)
    _with_value(checkpoint, tmp_path / "ckpt", ROUTED_EXPERT, math.nan)
    with pytest.raises(CheckpointError, match=ROUTED_EXPERT.replace(".", r"\.")):
        load_model(tmp_path / "ckpt", device="cpu", dtype=torch.bfloat16, quantize="int8")


def test_finite_checkpoint_loads_in_every_format(sharded: Path) -> None:
    for quantize in ("none", "int8", "fp8"):
        model = load_model(sharded, device="cpu", dtype=torch.float32, quantize=quantize)
        assert all(torch.isfinite(p.float()).all() for p in model.parameters())


def test_setup_stops_with_the_message(sharded: Path, tmp_path: Path, monkeypatch) -> None:
    """What Cog's setup runs: the CheckpointError itself reaches the log, naming the tensor."""
    _with_value(sharded, tmp_path / "ckpt", ROUTED_EXPERT, math.nan)
    monkeypatch.delenv("COG_WEIGHTS", raising=False)
    with pytest.raises(CheckpointError, match=r"experts\.3\.down_proj\.weight .*non-finite"):
        Service.start(str(tmp_path / "ckpt"))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_a_finite_tensor_whose_sum_overflows_is_accepted(dtype: torch.dtype) -> None:
    big = torch.full((64, 64), torch.finfo(dtype).max / 2, dtype=dtype)
    assert not torch.isfinite(big.sum())
    check_finite("language.model.norm.weight", Path("model.safetensors"), big)
    big[5, 6] = math.nan
    with pytest.raises(CheckpointError, match=r"1 NaN, 0 \+inf, 0 -inf of 4096; the first at index \[5, 6\]"):
        check_finite("language.model.norm.weight", Path("model.safetensors"), big)

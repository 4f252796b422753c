"""Smoke tests of scripts/benchmark.py on tiny random checkpoints (a few tokens each).

They check that every figure is printed (text and JSON), that the counts the script reports agree
with independent sources (processor facts, a parameter count of the loaded model), and that the
concurrency and target-row modes run end to end through the real engine and scheduler.
"""
from __future__ import annotations

import json
import re

import pytest
import torch

from deepseek_vl2.model.checkpoint import load_model
from scripts.benchmark import activated_parameters, kv_cache_bytes_per_position, main
from scripts.make_test_checkpoint import make_checkpoint

# Every single-request figure the script must report (JSON key → text label).
FIGURES = {
    "parameters": "parameters",
    "weight_file_bytes": "weight files",
    "read_seconds": "plain read of the weight files",
    "load_seconds": "Generator.load (model + processor)",
    "load_over_read": "load ÷ read",
    "prompt_tokens": "prompt tokens",
    "image_tokens": "of which image tokens",
    "prepare_seconds": "processor (Generator.prepare)",
    "ttft_seconds": "time to first token (from Generator.stream)",
    "ttft_with_prepare_seconds": "time to first token incl. prepare",
    "embed_seconds": "vision + projector + embedding",
    "prefill_seconds": "prefill (embedding + language model)",
    "prefill_tokens_per_second": "prefill speed",
    "decode_tokens_per_second": "decode speed",
    "decode_seconds_per_token": "decode time per token",
    "total_seconds": "request total (3 tokens)",  # the text test asks for 3 new tokens
    "peak_memory_bytes": "peak memory (process RSS)",
    "weights_bytes": "weights in memory",
    "activated_weight_bytes": "activated weights per token",
    "kv_read_bytes": "KV cache read per token at the mean context",
    "effective_weight_bandwidth_gbs": "activated weights ÷ time per token",
    "bandwidth_fraction": "fraction of the bandwidth bound",
}
NUMBER = r"[0-9][0-9,]*(\.[0-9]+)?(e[-+]?[0-9]+)?"


@pytest.fixture(autouse=True)
def keep_torch_threads():
    """main() may change torch's thread count (--threads); restore it for the other tests."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("bench-tiny"), variant="tiny", seed=3, eos_boost=0.0)


def run_json(capsys, argv: list[str]) -> dict:
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_text_output_has_every_figure_with_a_number(capsys, tiny_checkpoint) -> None:
    assert main(["--checkpoint", str(tiny_checkpoint), "--device", "cpu", "--new-tokens", "3",
                 "--image", "384x384"]) == 0
    lines = capsys.readouterr().out.splitlines()
    for key, label in FIGURES.items():
        matching = [line for line in lines if line.strip().startswith(label)]
        assert matching, f"no line for {key} ({label!r})"
        value = matching[0].strip()[len(label):].strip()
        if key == "bandwidth_fraction":
            assert value == "n/a", "the bandwidth fraction is a GPU-only figure"
        else:
            assert re.match(NUMBER, value), f"{label}: {value!r} is not a number"


def test_json_figures_agree_with_independent_counts(capsys, tiny_checkpoint) -> None:
    result = run_json(capsys, ["--checkpoint", str(tiny_checkpoint), "--device", "cpu", "--new-tokens", "4",
                               "--image", "768x384", "--threads", "1"])
    assert set(FIGURES) <= set(result)
    # One 768x384 image is a 2x1 tiling: 210 global + 1 separator + 14 * 29 local = 617 tokens.
    assert result["image_tokens"] == 617
    assert result["prompt_tokens"] > result["image_tokens"]
    model = load_model(tiny_checkpoint, "cpu", torch.float32)
    assert result["parameters"] == sum(p.numel() for p in model.parameters())
    assert result["weights_bytes"] == result["parameters"] * 4  # float32
    for key in ("read_seconds", "load_seconds", "ttft_seconds", "prefill_tokens_per_second",
                "decode_tokens_per_second", "peak_memory_bytes", "effective_weight_bandwidth_gbs"):
        assert result[key] > 0, key
    assert result["ttft_with_prepare_seconds"] > result["ttft_seconds"]
    assert result["prefill_seconds"] > result["embed_seconds"] > 0
    assert result["bandwidth_fraction"] is None  # CPU run
    assert result["meta"]["new_tokens"] == 4 and result["meta"]["image"] == [768, 384]


@pytest.mark.parametrize("variant, overrides", [("tiny", {}), ("small", {"q_lora_rank": 16}), ("base", {})])
def test_activated_parameters_match_the_loaded_model(tmp_path, variant, overrides) -> None:
    """Config formula versus a count over the real parameters (routed experts scaled by top-k / E)."""
    model = load_model(make_checkpoint(tmp_path / variant, variant=variant, **overrides), "cpu", torch.float32)
    config = model.config.language
    expected = 0
    for name, param in model.language.named_parameters():
        if name.endswith("embed_tokens.weight"):
            expected += param.shape[1]  # one row per token
        elif ".mlp.experts." in name:
            expected += param.numel() * config.num_experts_per_tok // config.n_routed_experts
        else:
            expected += param.numel()
    assert activated_parameters(config) == expected
    cache = model.new_cache(1, 5)
    assert kv_cache_bytes_per_position(config, 4) * 5 == cache.nbytes()


def test_concurrency_mode_generates_every_token(capsys, tiny_checkpoint) -> None:
    result = run_json(capsys, ["--checkpoint", str(tiny_checkpoint), "--device", "cpu", "--new-tokens", "3",
                               "--image", "none", "--concurrency", "1,3", "--temperature", "0"])
    levels = result["concurrency"]
    assert [level["concurrency"] for level in levels] == [1, 3]
    for level in levels:
        n = level["concurrency"]
        assert level["new_tokens"] == 3 * n and level["stopped_early"] == 0
        assert level["latency_max_seconds"] >= level["latency_mean_seconds"] > 0
        assert level["aggregate_tokens_per_second"] == pytest.approx(3 * n / level["wall_seconds"])
        assert result[f"c{n}_aggregate_tokens_per_second"] == level["aggregate_tokens_per_second"]


def test_random_checkpoint_and_target_rows(capsys) -> None:
    """Without --checkpoint the script writes its own random weights; --target-rows adds six rows."""
    result = run_json(capsys, ["--variant", "base", "--device", "cpu", "--new-tokens", "2", "--image", "none",
                               "--target-rows", "--threads", "1"])
    assert result["prompt_tokens"] > 0 and result["image_tokens"] == 0
    rows = result["target_rows"]
    assert len(rows) == 6
    assert all(row["value"] > 0 for row in rows)
    assert rows[0]["row"].startswith("decode tokens/s (base (reduced)")
    assert rows[0]["value"] == result["decode_tokens_per_second"]
    assert "1 image (global + 1 tile)" in rows[1]["row"] and rows[1]["with_prepare"] > rows[1]["value"]
    # 1152x768 is a 3x2 tiling: 210 + 1 + 28 * 43 = 1415 image tokens, plus the question.
    prompt_tokens = int(re.search(r"(\d+) prompt tokens, 128 new tokens", rows[2]["row"]).group(1))
    assert prompt_tokens > 1415
    assert "500 new tokens" in rows[3]["row"]
    assert rows[4]["value"] == result["load_over_read"]
    context = int(re.search(r"at a (\d+)-token context", rows[5]["row"]).group(1))
    assert 4000 < context <= 4096

"""Smoke tests of tools/benchmark.py (eager mode, reduced random weights, a few tokens each).

They check that the script drives the real engine for exactly the tokens asked (eos ignored),
that the counts it reports agree with independent sources (processor facts, the model's own
parameters, the KV cache's bytes) and that the target rows run end to end. The compiled mode
runs in tests/tools/test_gpu_check.py (the GPU check's dry run), which compiles once.
"""
from __future__ import annotations

import json
import re

import pytest
import torch

from deepseek_vl2.model.checkpoint import load_model
from deepseek_vl2.model.kv_cache import KVCache
from tools.bench_figures import peak_bandwidth_gbs
from tools.benchmark import activated_parameters, kv_cache_bytes_per_position, main
from tools.checkpoints import make_checkpoint
from tools.random_model import build_random_model, random_config_json


@pytest.fixture(autouse=True)
def keep_torch_threads():
    """main() may change torch's thread count (--threads); restore it for the other tests."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def run_json(capsys, argv: list[str]) -> dict:
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


SMOKE = ["--size", "reduced", "--device", "cpu", "--modes", "eager", "--threads", "1"]


def test_single_request_figures(capsys) -> None:
    result = run_json(capsys, [*SMOKE, "--new-tokens", "5", "--image", "768x384", "--repeats", "2"])
    # One 768x384 image is a 2x1 tiling: 210 global + 1 separator + 14 * 29 local = 617 tokens.
    assert result["image_tokens"] == 617 and result["prompt_tokens"] > 617
    runs = result["runs"]["eager"]
    assert len(runs) == 2  # --repeats
    for run in runs:
        assert 0 < run["ttft_seconds"] < run["total_seconds"]
        assert run["decode_tokens_per_second"] == pytest.approx(4 / (run["total_seconds"] - run["ttft_seconds"]))
    assert result["eager_decode_tokens_per_second"] == [round(r["decode_tokens_per_second"], 2) for r in runs]
    assert result["eager_bandwidth_fraction"] is None and result["peak_bandwidth_gbs"] is None  # CPU
    model, _ = build_random_model("tiny", torch.device("cpu"), torch.float32, size="reduced")
    assert result["parameters"] == sum(p.numel() for p in model.parameters())
    assert result["meta"]["new_tokens"] == 5


def test_prompt_is_padded_to_the_asked_token_count(capsys) -> None:
    result = run_json(capsys, [*SMOKE, "--new-tokens", "2", "--image", "300x200", "--prompt-tokens", "600",
                               "--repeats", "1"])
    assert abs(result["prompt_tokens"] - 600) <= 3


def test_text_report_shows_each_figure(capsys) -> None:
    assert main([*SMOKE, "--new-tokens", "3", "--image", "none", "--repeats", "1"]) == 0
    text = capsys.readouterr().out
    for label in ("prompt tokens", "eager: time to first token (each run)", "eager: decode speed (each run)",
                  "eager: bytes read per decoded token", "eager: fraction of the bandwidth bound"):
        assert re.search(rf"^  {re.escape(label)} +\S", text, re.M), label


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
    cache = KVCache(config, 1, 5, torch.device("cpu"), torch.float32)
    assert kv_cache_bytes_per_position(config, 4) * 5 == cache.nbytes()


def test_random_config_has_the_published_shapes() -> None:
    """The random base model is built from the published base shapes (built on meta: no draws)."""
    from deepseek_vl2.model.checkpoint import build_on_meta
    from deepseek_vl2.model.config import config_from_dict

    config = config_from_dict(random_config_json("base", "real", layers=2, vision_layers=1))
    language = config.language
    assert (language.hidden_size, language.n_routed_experts, language.kv_lora_rank, language.vocab_size) == (
        2560, 72, 512, 129280)
    assert language.topk_method == "noaux_tc" and config.vision.width == 1152
    model = build_on_meta(config)
    assert tuple(model.language.model.layers[1].mlp.experts.gate_up.shape) == (72, 2 * 1536, 2560)


def test_random_weights_are_drawn_with_the_test_checkpoint_scales() -> None:
    model, processor = build_random_model("base", torch.device("cpu"), torch.bfloat16, size="reduced", seed=1)
    config = model.config.language
    experts = model.language.model.layers[1].mlp.experts.gate_up
    assert experts.dtype == torch.bfloat16
    assert experts.float().std().item() == pytest.approx(config.hidden_size ** -0.5, rel=0.05)  # N(0, 1/fan_in)
    assert model.language.model.norm.weight.float().mean().item() == pytest.approx(1.0, abs=0.1)
    assert model.language.model.embed_tokens.weight.float().std().item() == pytest.approx(1.0, rel=0.05)
    assert all(torch.isfinite(p.float()).all() for p in model.parameters())
    again, _ = build_random_model("base", torch.device("cpu"), torch.bfloat16, size="reduced", seed=1)
    assert torch.equal(again.language.model.layers[1].mlp.experts.gate_up, experts)  # seeded
    assert processor.image_token_id < config.vocab_size


def test_peak_bandwidth_is_gpu_only_or_given() -> None:
    assert peak_bandwidth_gbs(torch.device("cpu")) is None
    assert peak_bandwidth_gbs(torch.device("cpu"), 1234.0) == 1234.0


def test_target_rows_run_every_workload(capsys) -> None:
    result = run_json(capsys, [*SMOKE, "--variant", "base", "--new-tokens", "2", "--image", "none", "--target-rows",
                               "--row-new-tokens-scale", "0.02", "--concurrency", "3", "--repeats", "1"])
    rows = {row["key"]: row for row in result["target_rows"]}
    assert list(rows) == ["decode", "ttft", "e2e_1428", "e2e_demo", "concurrency", "prefix", "setup", "memory"]
    prefix = rows["prefix"]["detail"]["eager"]  # the conversation ran without, then with the cache
    assert [turn["cached_tokens"] for turn in prefix["without"]] == [0, 0, 0]
    assert all(turn["cached_tokens"] > 0 for turn in prefix["with"][1:])
    assert rows["prefix"]["values"]["eager"] == max(prefix["turn_ratios"]) and rows["prefix"]["target"] == 0.2
    assert rows["decode"]["target"] == 100.0 and rows["ttft"]["target"] == 0.2 and rows["memory"]["target"] == 80.0
    assert rows["decode"]["values"]["eager"] == result["runs"]["eager"][0]["decode_tokens_per_second"]
    # 1428 prompt tokens (± a filler word), 128 × 0.02 → 2 new tokens.
    prompt_tokens = int(re.search(r"(\d+) prompt tokens, 2 new tokens", rows["e2e_1428"]["row"]).group(1))
    assert abs(prompt_tokens - 1428) <= 3
    assert "500" not in rows["e2e_demo"]["row"] and "10 new tokens" in rows["e2e_demo"]["row"]
    many = rows["concurrency"]["detail"]["eager"]["many"]
    assert many["concurrency"] == 3 and rows["concurrency"]["values"]["eager"] > 0
    assert rows["setup"]["note"].startswith("n/a")
    context = int(re.search(r"(\d+)-token context", rows["memory"]["row"]).group(1))
    assert context == 4096 and rows["memory"]["values"]["eager"] > 0


def test_json_lines_come_as_measured_and_a_failing_mode_drops_alone(capsys, tmp_path, monkeypatch) -> None:
    """--jsonl: one line per figure, written as measured (setup, runs, the sampled request, rows,
    done); a mode that fails (here the compiled warm-up, as when no C compiler is found) is
    dropped with a mode_failed line while eager still measures everything."""
    from deepseek_vl2.engine.step import CompiledStep

    def fails(self, *args, **kwargs):  # the warm-up falls back to eager: the benchmark drops the mode
        raise RuntimeError("InvalidCxxCompiler: no working C++ compiler found")

    monkeypatch.setattr(CompiledStep, "__call__", fails)
    lines = tmp_path / "bench.jsonl"
    result = run_json(capsys, [*SMOKE[:-4], "--modes", "eager,compiled", "--threads", "1", "--new-tokens", "3",
                               "--repeats", "1", "--target-rows", "--rows", "decode", "--jsonl", str(lines)])
    events = [json.loads(line) for line in lines.read_text().splitlines()]
    kinds = [e["event"] for e in events]
    assert kinds[0] == "setup" and kinds[-1] == "done"
    failed = [e for e in events if e["event"] == "mode_failed"]
    assert [(e["mode"], e["where"]) for e in failed] == [("compiled", "warm-up")] and "Cxx" in failed[0]["error"]
    assert [e["mode"] for e in events if e["event"] in ("run", "sampled")] == ["eager", "eager"]
    sampled = next(e for e in events if e["event"] == "sampled")
    assert (sampled["temperature"], sampled["top_p"], sampled["new_tokens"]) == (0.7, 0.9, 3)
    assert sampled["decode_tokens_per_second"] > 0
    assert result["modes_measured"] == ["eager"] and set(result["target_rows"][0]["values"]) == {"eager"}
    assert [e["key"] for e in events if e["event"] == "row"] == ["decode"]


def test_setup_only_prints_one_json_object_of_setup_phases(capsys) -> None:
    result = run_json(capsys, [*SMOKE, "--variant", "base", "--layers", "2", "--setup-only"])
    setup = result["setup"]
    assert list(result) == ["setup"] and setup["layers"] == 2 and setup["path"] == "eager"
    assert (setup["compiles"], setup["graphs"], setup["compile_seconds"]) == (0, 0, 0.0)  # eager compiles nothing
    assert list(setup["phases"]) == ["load", "compile", "capture"]
    assert setup["total_seconds"] >= sum(setup["phases"].values()) - 1e-6 and setup["phases"]["load"] > 0

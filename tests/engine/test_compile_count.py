"""Compile once, before the first request: a whole serving run on the CPU with compilation on.

Setup (``Service.start`` with ``DSVL2_COMPILE=1`` and 8 slots) compiles the decode step region by
region (engine/step.py): per rows bucket (1, 2, 4, 8) one inputs region, one region per kind of
decoder layer (dense, MoE: shared by every layer of that kind, so 4 layers compile like 2) and one
outputs region per mode (full, greedy) — and prints that count. Then 24 mixed requests (1 to 8 at
once; greedy and sampled; short and near the context limit; with and without an image) must cause
zero Dynamo compiles, and the engine must still run its compiled path.

What Dynamo counts: ``counters["stats"]["unique_graphs"]``, one per graph it compiled, recompiles
included. The checkpoint is the reduced random one of
tools/checkpoints.py with 4 layers (1 dense, 3 MoE) and a 1024-token context (compiling costs tens of
seconds per function on a small CPU).

The next tests replace CUDA-graph capture by a recording stand-in so that the capture rules hold
on the CPU: only the warm-up captures, every (rows, kv_len, mode) once; after it a step only
replays. A failed compile or capture, or a spent time budget, leaves setup running the eager step.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import threading
from unittest import mock

import pytest
import torch
from PIL import Image
from torch._dynamo.utils import counters

from deepseek_vl2.engine.decode import DecodeEngine, batch_buckets
from deepseek_vl2.engine.sampling import SamplingParams
from tools.checkpoints import make_checkpoint

pytestmark = pytest.mark.slow  # torch.compile on the CPU: minutes

SLOTS = 8
CONTEXT = 1024


def dynamo_counts() -> int:
    """Graphs Dynamo compiled so far in this process (recompiles included)."""
    return counters["stats"]["unique_graphs"]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A started Service (setup done) and what its setup printed."""
    from deepseek_vl2.serving.service import Service

    checkpoint = make_checkpoint(tmp_path_factory.mktemp("compile-count") / "tiny", variant="tiny", seed=3,
                                 layers=4, max_position_embeddings=CONTEXT)
    env = {"DSVL2_COMPILE": "1", "COG_MAX_CONCURRENCY": str(SLOTS), "DSVL2_WARMUP_SECONDS": "3000"}
    printed = io.StringIO()
    logger = logging.getLogger("deepseek_vl2")
    handlers, level = list(logger.handlers), logger.level
    with mock.patch.dict(os.environ, env), contextlib.redirect_stdout(printed):
        service = Service.start(str(checkpoint))
    yield service, printed.getvalue()
    service.scheduler.close()
    logger.handlers[:], logger.level = handlers, level  # setup printed the engine's log: stop, for later tests


def _prompt(service, words: int, image: bool = False):
    images = [Image.new("RGB", (96, 64), (10, 200, 30))] if image else []
    prompt = ("<image>\n" if image else "") + "Describe" + " the picture" * words
    return service.engine.prepare(prompt, images)


def _requests(service) -> list[list[tuple]]:
    """24 requests in waves of 1 to 8 at once: (inputs, params)."""
    short, with_image = _prompt(service, 2), _prompt(service, 3, image=True)
    per_word = (_prompt(service, 40).input_ids.numel() - short.input_ids.numel()) / 38
    near_limit = _prompt(service, int((CONTEXT - 60 - short.input_ids.numel()) / per_word))
    assert CONTEXT - 120 < near_limit.input_ids.numel() < CONTEXT - 20  # its decode crosses the last KV buckets
    greedy = lambda n: SamplingParams(temperature=0.0, max_new_tokens=n, ignore_eos=True)  # noqa: E731
    sampled = lambda n, s: SamplingParams(temperature=0.7, top_p=0.9, max_new_tokens=n, seed=s,  # noqa: E731
                                          ignore_eos=True)
    default = lambda n: SamplingParams(temperature=0.1, top_p=0.9, repetition_penalty=1.1, max_new_tokens=n)  # noqa: E731
    waves = [
        [(short, sampled(6, 1))],
        [(short, greedy(5)), (with_image, sampled(7, 2))],
        [(near_limit, greedy(40)), (short, default(9)), (short, sampled(4, 3))],
        [(short, greedy(3 + i)) if i % 2 else (with_image, sampled(5 + i, 10 + i)) for i in range(8)],
        [(near_limit, sampled(45, 7)), (short, greedy(12)), (with_image, default(6)), (short, sampled(8, 8)),
         (short, greedy(2))],
        [(short, default(11)), (short, sampled(3, 9)), (near_limit, greedy(50)), (short, greedy(4)),
         (with_image, sampled(6, 12))],
    ]
    assert sum(map(len, waves)) >= 20 and max(map(len, waves)) == 8
    return waves


def test_a_serving_run_compiles_only_in_setup(served) -> None:
    service, printed = served
    engine = service.engine.engine
    regions_per_rows = 1 + 2 + 2  # inputs, the dense and the MoE layer, outputs per mode
    compiles = len(batch_buckets(SLOTS)) * regions_per_rows
    assert engine.sealed and engine.path == "compiled"
    assert engine.warmup_summary["compiles"] == compiles, engine.warmup_summary
    assert f"{compiles} compile(s)" in printed  # setup prints the count
    before = dynamo_counts()
    for wave in _requests(service):
        handles = [service.scheduler.submit(inputs, params) for inputs, params in wave]
        for handle in handles:
            "".join(handle)
            assert handle.stats.new_tokens >= 1, handle.stats
    assert dynamo_counts() == before, "a request compiled the decode step after setup"
    assert engine.path == "compiled" and engine.fallback_reason is None


class RecordedGraph:
    """Stands in for a captured CUDA graph on the CPU: replay re-runs the compiled step into the
    outputs it returned at capture."""

    def __init__(self, run) -> None:
        self.run = run
        self.replays = 0

    def replay(self) -> None:
        self.replays += 1
        for out, new in zip(self.outputs, self.run()):
            out.copy_(new)


def _recording_engine(model, monkeypatch, slots: int = 2) -> tuple[DecodeEngine, list]:
    """A compiled engine whose CUDA-graph captures are recorded stand-ins (the CPU has no graphs)."""
    engine = DecodeEngine(model, slots=slots, max_len=512, compile=True, kv_bucket=256)
    captured: list[tuple[int, int, bool]] = []

    def capture(rows: int, kv_len: int, full: bool):
        assert threading.current_thread() is threading.main_thread()
        captured.append((rows, kv_len, full))
        fn = engine._step_function(rows, full)
        graph = RecordedGraph(lambda: fn(engine._key_positions(kv_len)))
        graph.outputs = tuple(t.clone() for t in graph.run())
        return graph, graph.outputs

    monkeypatch.setattr(engine, "use_graphs", True)
    monkeypatch.setattr(engine, "_capture", capture)
    return engine, captured


def test_only_the_warm_up_captures_and_a_step_only_replays_after_it(served, monkeypatch) -> None:
    service, _ = served
    model = service.engine.model
    engine, captured = _recording_engine(model, monkeypatch)
    engine.warmup()
    assert sorted(captured) == sorted((r, kv, f) for r in (1, 2) for kv in (256, 512) for f in (False, True))
    assert engine.warmup_summary["graphs"] == 8 and engine.path == "compiled + CUDA graphs"
    monkeypatch.setattr(engine, "_capture", lambda *key: pytest.fail(f"a step captured {key}"))
    monkeypatch.setattr(engine, "_step_function", lambda *key: pytest.fail(f"a step ran un-graphed {key}"))
    before = dynamo_counts()
    seen = torch.zeros(model.config.language.vocab_size, dtype=torch.bool)
    greedy, sampled = SamplingParams(temperature=0.0), SamplingParams(temperature=0.7, top_p=0.9)
    with torch.inference_mode():
        for slot in (0, 1):
            engine.start_row(slot, token=5 + slot, position=3, seen=seen, params=sampled if slot else greedy)
        replays = lambda: sum(g.replays for g, _ in engine._graphs.values())  # noqa: E731
        engine.step([0], [4], [greedy], [None])  # (1, 256, greedy)
        engine.step([0], [300], [greedy], [None])  # (1, 512, greedy)
        engine.step([0, 1], [4, 4], [greedy, sampled], [None, torch.Generator().manual_seed(1)])  # (2, 256, full)
        assert replays() == 3
    assert dynamo_counts() == before, "a step compiled after the warm-up"


@pytest.mark.parametrize("failure", ["capture", "compile", "budget"])
def test_a_failed_warm_up_falls_back_to_the_eager_step_and_says_why(served, monkeypatch, caplog, failure) -> None:
    service, _ = served
    engine, captured = _recording_engine(service.engine.model, monkeypatch, slots=1)
    if failure == "capture":
        monkeypatch.setattr(engine, "_capture", mock.Mock(side_effect=RuntimeError(
            "operation not permitted when stream is capturing")))
    if failure == "compile":
        monkeypatch.setattr(type(engine._compiled_step), "__call__", mock.Mock(side_effect=RuntimeError(
            "InductorError: no C++ compiler found")))
    with caplog.at_level(logging.WARNING, logger="deepseek_vl2"):
        engine.warmup(max_seconds=0 if failure == "budget" else None)
    reason = {"capture": "not permitted", "compile": "no C++ compiler", "budget": "0 s budget"}[failure]
    assert engine.sealed and engine.path == "eager" and reason in engine.fallback_reason
    assert reason in caplog.text and "runs eagerly" in caplog.text
    assert not engine._graphs and engine.warmup_summary["fallback"] == engine.fallback_reason
    seen = torch.zeros(service.engine.model.config.language.vocab_size, dtype=torch.bool)
    greedy = SamplingParams(temperature=0.0)
    with torch.inference_mode():
        engine.start_row(0, token=5, position=3, seen=seen, params=greedy)
        tokens, _ = engine.step([0], [4], [greedy], [None])  # the eager step serves
    assert 0 <= int(tokens[0]) < service.engine.model.config.language.vocab_size

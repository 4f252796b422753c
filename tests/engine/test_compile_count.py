"""Compile once, before the first request: a whole serving run on the CPU with compilation on.

Setup (``Service.start`` with ``DSVL2_COMPILE=1`` and 8 slots) compiles the decode step once per
(rows bucket, mode) — 1, 2, 4, 8 rows × full, greedy — and prints that count per mode. Then 24
mixed requests (1 to 8 at once; greedy and sampled; short and near the context limit; with and
without an image) must cause zero Dynamo compiles, and none may run an eager fallback.

What Dynamo counts: ``counters["stats"]["unique_graphs"]``, one per graph it compiled, recompiles
included. The checkpoint is the reduced random one of
tools/checkpoints.py with 2 layers and a 1024-token context (compiling costs tens of
seconds per function on a small CPU).

The second test replaces CUDA-graph capture by a recording stand-in so that the capture rules
hold on the CPU: only the warm-up captures, and a step whose bucket was not captured (or whose
(rows, mode) was not compiled) runs without capturing or compiling.
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
                                 layers=2, max_position_embeddings=CONTEXT)
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
    buckets = len(batch_buckets(SLOTS))
    assert engine.sealed
    assert engine.warmup_summary["compiles"] == {"full": buckets, "greedy": buckets}, engine.warmup_summary
    assert "compiles per mode {'full': 4, 'greedy': 4}" in printed  # setup prints the count per mode
    before = dynamo_counts()
    for wave in _requests(service):
        handles = [service.scheduler.submit(inputs, params) for inputs, params in wave]
        for handle in handles:
            "".join(handle)
            assert handle.stats.new_tokens >= 1, handle.stats
    assert dynamo_counts() == before, "a request compiled the decode step after setup"
    assert not engine._eager_fallbacks, "a request ran a (rows, mode) the warm-up did not compile"


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


def test_only_the_warm_up_captures_and_a_step_never_compiles_after_it(served, monkeypatch) -> None:
    service, _ = served
    model = service.engine.model
    engine = DecodeEngine(model, slots=2, max_len=512, compile=True, kv_bucket=256)
    captured: list[tuple[int, int, bool]] = []

    def capture(rows: int, kv_len: int, full: bool):
        assert threading.current_thread() is threading.main_thread()
        captured.append((rows, kv_len, full))
        fn = engine._compiled_function(rows, full)
        graph = RecordedGraph(lambda: fn(engine._key_positions(kv_len)))
        graph.outputs = tuple(t.clone() for t in graph.run())
        return graph, graph.outputs

    monkeypatch.setattr(engine, "use_graphs", True)
    monkeypatch.setattr(engine, "_capture", capture)
    engine.warmup(rows=[1], kv_lens=[256])  # rows 2 neither compiled nor captured; kv 512 not captured
    assert sorted(captured) == [(1, 256, False), (1, 256, True)]
    assert engine.warmup_summary["graphs"] == 2
    monkeypatch.setattr(engine, "_capture", lambda *key: pytest.fail(f"a step captured {key}"))
    before = dynamo_counts()
    vocab = model.config.language.vocab_size
    seen = torch.zeros(vocab, dtype=torch.bool)
    greedy, sampled = SamplingParams(temperature=0.0), SamplingParams(temperature=0.7, top_p=0.9)
    with torch.inference_mode():
        for slot in (0, 1):
            engine.start_row(slot, token=5 + slot, position=3, seen=seen, params=sampled if slot else greedy)
        replays = lambda: sum(g.replays for g, _ in engine._graphs.values())  # noqa: E731
        engine.step([0], [4], [greedy], [None])  # (1, 256, greedy): the captured graph
        assert replays() == 1
        engine.step([0], [300], [greedy], [None])  # (1, 512): the compiled function, un-graphed
        engine.step([0, 1], [4, 4], [greedy, sampled], [None, torch.Generator().manual_seed(1)])  # rows 2: eager
        assert replays() == 1
    assert dynamo_counts() == before, "a step compiled after the warm-up"
    assert engine._eager_fallbacks == {(2, True)}


def test_a_failed_capture_leaves_setup_running_un_graphed(served, monkeypatch) -> None:
    service, _ = served
    engine = DecodeEngine(service.engine.model, slots=1, max_len=512, compile=True, kv_bucket=256)
    captured = []

    def capture(rows: int, kv_len: int, full: bool):
        if captured:
            raise RuntimeError("operation not permitted when stream is capturing")
        captured.append((rows, kv_len, full))
        return RecordedGraph(lambda: ()), ()

    monkeypatch.setattr(engine, "use_graphs", True)
    monkeypatch.setattr(engine, "_capture", capture)
    engine.warmup(kv_lens=[256, 512], modes=["greedy"])
    assert engine.sealed and engine.warmup_summary["graphs"] == 1
    assert "not permitted" in engine.warmup_summary["capture_error"]
    assert list(engine._graphs) == [(1, 256, False)]

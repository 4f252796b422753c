"""Nothing hangs, nothing is lost: a fault injected at each point of a scheduler turn fails the
requests it concerns with its error, the others finish with exactly their tokens alone, and the
next request is served; a loop that cannot go on, or a step stuck beyond its limit, ends every
waiting consumer with a message, refuses new requests at once and reports itself unhealthy.

Runs on a small random checkpoint written by tools/checkpoints.py (no fixtures needed).
"""
from __future__ import annotations

import asyncio
import io
import logging
import sys
import threading
import time
from typing import Callable

import pytest
import torch

from deepseek_vl2.engine import scheduler as scheduler_module
from deepseek_vl2.engine.generation import Generator
from deepseek_vl2.engine.sampling import SamplingParams
from deepseek_vl2.engine.scheduler import BatchScheduler, EngineStoppedError, StepTimeoutError
from deepseek_vl2.serving.service import _PrintHandler
from tools.checkpoints import make_checkpoint
from tools.testing.streams import consume_all

PROMPTS = ["What is two plus two?", "Hi", "Tell me about boats."]
DOOMED = 1  # the request each fault is aimed at


class InjectedFault(RuntimeError):
    """The error a test injects."""


@pytest.fixture(scope="module")
def generator(tmp_path_factory) -> Generator:
    path = make_checkpoint(tmp_path_factory.mktemp("tiny"), variant="tiny", seed=7, eos_boost=1.0)
    return Generator.load(path, device="cpu", dtype=torch.float32)


def _params() -> list[SamplingParams]:
    """A sampled, a greedy and a filtered request; eos ignored so each runs its full length."""
    return [SamplingParams(temperature=0.8, max_new_tokens=10, seed=11, ignore_eos=True),
            SamplingParams(temperature=0.0, max_new_tokens=9, ignore_eos=True),
            SamplingParams(temperature=0.6, top_k=5, repetition_penalty=1.3, max_new_tokens=11, seed=5,
                           ignore_eos=True)]


@pytest.fixture(scope="module")
def expected(generator: Generator) -> list[list[int]]:
    """Each request's tokens run alone, one after another."""
    with BatchScheduler(generator, max_batch=1, max_len=1024) as scheduler:
        return [scheduler.run(generator.prepare(p, []), q).tokens for p, q in zip(PROMPTS, _params())]


def _storm_with(generator: Generator, expected: list[list[int]], inject: Callable[[BatchScheduler, list], None],
                lost_slots: int = 0) -> list[object]:
    """Three requests on a 3-slot scheduler with a fault injected by ``inject(scheduler, params)``;
    checks the next request is served with its tokens alone and every slot but ``lost_slots`` is
    free; returns the three outcomes."""
    params = _params()
    scheduler = BatchScheduler(generator, max_batch=3, max_len=1024)
    try:
        inject(scheduler, params)
        handles = [scheduler.submit(generator.prepare(p, []), q) for p, q in zip(PROMPTS, params)]
        results = consume_all(handles)
        assert scheduler.healthy
        follow_up = SamplingParams(temperature=0.0, max_new_tokens=9, ignore_eos=True)
        assert scheduler.run(generator.prepare(PROMPTS[1], []), follow_up).tokens == expected[1]
        assert scheduler.active == 0
        assert len(generator.engine.free_slots) == generator.engine.slots - lost_slots
    finally:
        scheduler.close()
        _give_back_lost_slots(generator)
    return results


def _give_back_lost_slots(generator: Generator) -> None:
    """Slots a test's fault left held, given back for the next test."""
    for slot in set(range(generator.engine.slots)) - set(generator.engine.free_slots):
        generator.engine.release(slot)


def _doomed(request_or_params, params: list[SamplingParams]) -> bool:
    target = getattr(request_or_params, "params", request_or_params)
    return target is params[DOOMED]


def _fault_at_admission(monkeypatch, generator: Generator) -> Callable:
    def inject(scheduler: BatchScheduler, params: list) -> None:
        real = generator.admit
        monkeypatch.setattr(generator, "admit", lambda r: _raise("admit") if _doomed(r, params) else real(r))
    return inject


def _fault_in_prefill_chunk(monkeypatch, generator: Generator) -> Callable:
    def inject(scheduler: BatchScheduler, params: list) -> None:
        real = generator.prefill_step
        monkeypatch.setattr(generator, "prefill_step",
                            lambda r: _raise("prefill chunk") if _doomed(r, params) else real(r))
    return inject


def _fault_sampling_the_first_token(monkeypatch, generator: Generator) -> Callable:
    def inject(scheduler: BatchScheduler, params: list) -> None:
        real = generator.sample
        monkeypatch.setattr(generator, "sample", lambda rs, logits: _raise("first-token sampling")
                            if any(_doomed(r, params) for r in rs) else real(rs, logits))
    return inject


def _fault_in_decode_step(monkeypatch, generator: Generator) -> Callable:
    def inject(scheduler: BatchScheduler, params: list) -> None:
        real = generator.engine.step

        def step(slots, lengths, step_params, generators):
            outputs = real(slots, lengths, step_params, generators)
            if any(p is params[DOOMED] for p in step_params):
                _raise("decode step")
            return outputs
        monkeypatch.setattr(generator.engine, "step", step)
    return inject


def _fault_recording_a_token(monkeypatch, generator: Generator) -> Callable:
    def inject(scheduler: BatchScheduler, params: list) -> None:
        real = generator.accept
        monkeypatch.setattr(generator, "accept", lambda r, t: _raise("accept")
                            if _doomed(r, params) and len(r.tokens) == 3 else real(r, t))
    return inject


def _fault_emitting_text(monkeypatch, generator: Generator) -> Callable:
    def inject(scheduler: BatchScheduler, params: list) -> None:
        real = scheduler_module.RequestHandle.deliver

        def deliver(handle, piece):
            if _doomed(handle.request, params) and len(handle.request.tokens) >= 2:
                _raise("emit")
            real(handle, piece)
        monkeypatch.setattr(scheduler_module.RequestHandle, "deliver", deliver)
    return inject


def _fault_retiring(monkeypatch, generator: Generator) -> Callable:
    def inject(scheduler: BatchScheduler, params: list) -> None:
        real = generator.release
        monkeypatch.setattr(generator, "release", lambda r: _raise("retire")
                            if _doomed(r, params) and r.slot is not None else real(r))
    return inject


def _raise(where: str):
    raise InjectedFault(f"injected fault: {where}")


FAULTS = {
    "admit": _fault_at_admission, "prefill chunk": _fault_in_prefill_chunk,
    "first-token sampling": _fault_sampling_the_first_token, "decode step": _fault_in_decode_step,
    "accept": _fault_recording_a_token, "emit": _fault_emitting_text, "retire": _fault_retiring,
}


@pytest.mark.parametrize("where", list(FAULTS))
def test_a_fault_fails_its_request_only_and_the_next_is_served(where: str, generator: Generator, expected,
                                                               monkeypatch) -> None:
    outcomes = _storm_with(generator, expected, FAULTS[where](monkeypatch, generator),
                           lost_slots=1 if where == "retire" else 0)  # its slot could not be given back
    doomed = outcomes.pop(DOOMED)
    assert isinstance(doomed, InjectedFault) and where in str(doomed), doomed
    assert outcomes == [expected[0], expected[2]]


class _RaisingHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        raise InjectedFault("injected fault: a log handler")


def test_a_log_handler_that_raises_does_not_stop_the_loop(generator: Generator, expected, monkeypatch) -> None:
    """The decode step fails for one request and every log line the scheduler writes about it
    raises in its handler: that request fails with the step's error, the others and the next go on."""
    logger = logging.getLogger("deepseek_vl2")
    handler = _RaisingHandler()
    logger.addHandler(handler)
    try:
        outcomes = _storm_with(generator, expected, _fault_in_decode_step(monkeypatch, generator))
    finally:
        logger.removeHandler(handler)
    doomed = outcomes.pop(DOOMED)
    assert isinstance(doomed, InjectedFault) and "decode step" in str(doomed)
    assert outcomes == [expected[0], expected[2]]


def test_the_print_handler_survives_a_broken_stdout(monkeypatch) -> None:
    """Cog's log routing can close the stream a line goes to: the line is dropped, not raised."""
    closed = io.StringIO()
    closed.close()
    monkeypatch.setattr(sys, "stdout", closed)
    monkeypatch.setattr(logging, "raiseExceptions", False)  # handleError stays quiet
    record = logging.LogRecord("deepseek_vl2", logging.ERROR, __file__, 1, "a line", None, None)
    _PrintHandler().emit(record)


def test_a_failure_planning_the_turn_fails_its_requests_and_the_loop_goes_on(generator: Generator, expected,
                                                                             monkeypatch) -> None:
    """The policy itself raises once: every request the turn held fails with that error."""
    real, fired = scheduler_module.schedule, []

    def schedule_once_broken(*args, **kwargs):
        if not fired:
            fired.append(True)
            _raise("planning a turn")
        return real(*args, **kwargs)

    def inject(scheduler: BatchScheduler, params: list) -> None:
        monkeypatch.setattr(scheduler_module, "schedule", schedule_once_broken)

    outcomes = _storm_with(generator, expected, inject)
    assert fired and any(isinstance(o, InjectedFault) for o in outcomes), outcomes
    assert all(isinstance(o, InjectedFault) or o == e for o, e in zip(outcomes, expected))


class _Fatal(BaseException):
    """Not an Exception: nothing in a turn may swallow it (as SystemExit or KeyboardInterrupt)."""


def test_a_loop_that_cannot_go_on_says_so(generator: Generator, monkeypatch) -> None:
    """A BaseException in a decode step ends the loop: the running requests fail saying the engine
    stopped, new ones are refused at once, and the scheduler reports itself unhealthy."""
    submitted = threading.Event()

    def lost(*args, **kwargs):
        submitted.wait(timeout=30)  # all three are in before the loop ends
        raise _Fatal("device lost")

    monkeypatch.setattr(generator.engine, "step", lost)
    scheduler = BatchScheduler(generator, max_batch=2, max_len=1024)
    try:
        handles = [scheduler.submit(generator.prepare(p, []), q) for p, q in zip(PROMPTS, _params())]
        submitted.set()
        results = consume_all(handles, timeout=30)
        assert all(isinstance(r, EngineStoppedError) and "device lost" in str(r) for r in results), results
        assert not scheduler.healthy
        started = time.monotonic()
        with pytest.raises(EngineStoppedError, match="cannot run predictions until the server restarts"):
            scheduler.submit(generator.prepare("Hi", []), SamplingParams(temperature=0.0, max_new_tokens=2))
        assert time.monotonic() - started < 1
    finally:
        scheduler.close()
        _give_back_lost_slots(generator)


def test_a_stuck_step_ends_its_requests_within_the_bound_and_the_loop_recovers(generator: Generator,
                                                                                monkeypatch) -> None:
    """A decode step blocks past ``step_timeout``: the consumers (sync and async) end with a message
    naming the setting, new requests are refused at once, health is down; once the step returns,
    the loop drops the ended requests and serves again."""
    release, real = threading.Event(), generator.engine.step

    def blocking_step(*args, **kwargs):
        release.wait(timeout=60)
        return real(*args, **kwargs)

    monkeypatch.setattr(generator.engine, "step", blocking_step)
    scheduler = BatchScheduler(generator, max_batch=2, max_len=1024, step_timeout=0.5)
    params = SamplingParams(temperature=0.0, max_new_tokens=4)
    try:
        stuck = scheduler.submit(generator.prepare("Hi", []), params)
        other = scheduler.submit(generator.prepare("Hello", []), params)

        async def read_async() -> BaseException:
            try:
                async for _ in other:
                    pass
            except StepTimeoutError as error:
                return error
            raise AssertionError("the async stream ended without the step's error")

        started = time.monotonic()
        with pytest.raises(StepTimeoutError, match="DSVL2_STEP_TIMEOUT_SECONDS"):
            "".join(stuck)
        assert "made no progress" in str(asyncio.run(read_async()))
        assert time.monotonic() - started < 5
        assert not scheduler.healthy
        with pytest.raises(StepTimeoutError):
            scheduler.submit(generator.prepare("Hi", []), params)
        release.set()
        deadline = time.monotonic() + 30
        while not scheduler.healthy or scheduler.active:
            assert time.monotonic() < deadline, "the loop did not recover after the step returned"
            time.sleep(0.05)
        assert len(scheduler.run(generator.prepare("Hi", []), params).tokens) >= 1
    finally:
        release.set()
        scheduler.close()


def test_submit_after_close_raises(generator: Generator) -> None:
    scheduler = BatchScheduler(generator, max_batch=1, max_len=1024)
    scheduler.close()
    with pytest.raises(EngineStoppedError, match="closed"):
        scheduler.submit(generator.prepare("Hi", []), SamplingParams(temperature=0.0, max_new_tokens=2))


def test_every_slot_lost_stops_the_loop_with_a_message(generator: Generator, monkeypatch) -> None:
    """Giving slots back always fails; requests run one at a time: each of the first ``slots``
    requests ends with that error and loses its slot, the one after cannot ever get a slot, so it
    fails saying the slots were lost (no spin, no hang)."""
    monkeypatch.setattr(generator, "release", lambda r: _raise("retire"))
    scheduler = BatchScheduler(generator, max_batch=1, max_len=1024)
    params = SamplingParams(temperature=0.0, max_new_tokens=2)
    slots = generator.engine.slots
    try:
        handles = [scheduler.submit(generator.prepare("Hi", []), params) for _ in range(slots + 1)]
        results = consume_all(handles, timeout=30)
        assert all(isinstance(r, InjectedFault) for r in results[:slots]), results
        assert isinstance(results[slots], EngineStoppedError) and "slots were lost" in str(results[slots]), results
        assert not scheduler.healthy
    finally:
        scheduler.close()
        monkeypatch.undo()
        _give_back_lost_slots(generator)

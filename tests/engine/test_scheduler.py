"""The batching scheduler: its policy as a pure function (no threads), a request's phases, and what a
failure inside a batched decode step does to the requests beside it (injected faults).

Runs on a small random checkpoint written by tools/checkpoints.py (no fixtures needed).
"""
from __future__ import annotations


import pytest
import torch

from deepseek_vl2.engine.generation import Generator
from deepseek_vl2.engine.request import Phase
from deepseek_vl2.engine.sampling import SamplingParams
from deepseek_vl2.engine.scheduler import BatchScheduler, Plan, schedule
from tools.checkpoints import make_checkpoint
from tools.testing.streams import consume_all

# ----------------------------------------------------------------------------- the policy, pure


def test_admits_the_oldest_waiting_into_free_room() -> None:
    plan = schedule(waiting=["w1", "w2", "w3"], prefilling=[], decoding=["d1"], free_slots=8, max_batch=3)
    assert plan == Plan(admit=("w1", "w2"), prefill="w1", decode=("d1",))


def test_admission_is_bounded_by_the_free_slots_too() -> None:
    """Slots held outside the scheduler (a single-request stream) leave fewer free than max_batch allows."""
    plan = schedule(waiting=["w1", "w2"], prefilling=[], decoding=[], free_slots=1, max_batch=4)
    assert plan.admit == ("w1",)
    assert schedule(["w1"], [], [], free_slots=0, max_batch=4).admit == ()


def test_a_full_batch_admits_nobody_and_keeps_prefilling_in_turn() -> None:
    plan = schedule(waiting=["w1"], prefilling=["p1", "p2"], decoding=["d1", "d2"], free_slots=4, max_batch=4)
    assert plan == Plan(admit=(), prefill="p1", decode=("d1", "d2"))


def test_one_prefill_chunk_per_turn_beside_the_decode_step() -> None:
    plan = schedule(waiting=[], prefilling=["p2", "p1"], decoding=["d1"], free_slots=5, max_batch=8)
    assert plan.prefill == "p2" and plan.decode == ("d1",) and plan.admit == ()


def test_nothing_to_do() -> None:
    assert schedule([], [], [], free_slots=3, max_batch=3) == Plan(admit=(), prefill=None, decode=())


def test_more_active_than_max_batch_admits_nobody() -> None:
    assert schedule(["w1"], ["p1"], ["d1", "d2"], free_slots=6, max_batch=2).admit == ()


# ----------------------------------------------------------------------------- on a model


@pytest.fixture(scope="module")
def generator(tmp_path_factory) -> Generator:
    path = make_checkpoint(tmp_path_factory.mktemp("tiny"), variant="tiny", seed=7, eos_boost=1.0)
    return Generator.load(path, device="cpu", dtype=torch.float32)


PROMPTS = ["What is two plus two?", "Hi", "Tell me about boats."]


def _params() -> list[SamplingParams]:
    """A sampled, a greedy and a filtered request; eos ignored so each runs its full length."""
    return [SamplingParams(temperature=0.8, max_new_tokens=10, seed=11, ignore_eos=True),
            SamplingParams(temperature=0.0, max_new_tokens=9, ignore_eos=True),
            SamplingParams(temperature=0.6, top_k=5, repetition_penalty=1.3, max_new_tokens=11, seed=5,
                           ignore_eos=True)]


def _run_batched(generator: Generator, params: list[SamplingParams]) -> list[object]:
    """Each request's tokens through a 3-slot scheduler, or the exception its stream raised."""
    inputs = [generator.prepare(p, []) for p in PROMPTS]
    scheduler = BatchScheduler(generator, max_batch=3, max_len=1024)
    try:
        handles = [scheduler.submit(i, p) for i, p in zip(inputs, params)]
        results = consume_all(handles)
        assert scheduler.active == 0 and sorted(generator.engine.free_slots) == list(range(generator.engine.slots))
    finally:
        scheduler.close()
    return results


def _sequential(generator: Generator, params: list[SamplingParams]) -> list[list[int]]:
    """Each request's tokens run alone, one after another, through a one-slot scheduler."""
    with BatchScheduler(generator, max_batch=1, max_len=1024) as scheduler:
        return [scheduler.run(generator.prepare(p, []), q).tokens for p, q in zip(PROMPTS, params)]


def test_a_request_goes_through_its_phases(generator: Generator) -> None:
    request = generator.new_request(generator.prepare("Hi", []), SamplingParams(temperature=0.0, max_new_tokens=2))
    assert request.phase is Phase.WAITING and request.slot is None
    generator.admit(request)
    assert request.phase is Phase.PREFILLING and request.slot is not None
    while not generator.prefill_step(request):
        assert request.phase is Phase.PREFILLING
    assert request.phase is Phase.SAMPLING and request.next_logits is not None
    generator.sample([request], request.next_logits.unsqueeze(0))
    assert request.phase is Phase.SAMPLING
    generator.accept(request, generator.next_tokens([request])[0])
    assert request.phase is Phase.FINISHED and request.stats.finish_reason == "length"
    slot = request.slot
    generator.release(request)
    assert request.slot is None and slot in generator.engine.free_slots
    generator.release(request)  # holds nothing: nothing to give back
    with pytest.raises(ValueError, match=f"slot {slot} is not held"):
        generator.engine.release(slot)


def test_a_failed_batched_step_is_rewound_not_stepped_twice(generator: Generator, monkeypatch) -> None:
    """The step runs in full (rows, positions, seen ids and generators advance) and then raises, once,
    while all three requests share it: every request still ends with exactly its sequential tokens."""
    params = _params()
    expected = _sequential(generator, params)
    real_step = generator.engine.step
    fired = []

    def step_then_fail(slots, *args, **kwargs):
        outputs = real_step(slots, *args, **kwargs)
        if len(slots) == 3 and not fired:
            fired.append(list(slots))
            raise RuntimeError("injected failure after the step's writes")
        return outputs

    monkeypatch.setattr(generator.engine, "step", step_then_fail)
    assert _run_batched(generator, params) == expected
    assert fired, "the three requests never shared a step: the fault was not injected"


def test_a_request_that_fails_alone_fails_and_the_others_keep_their_tokens(generator: Generator,
                                                                          monkeypatch) -> None:
    """Every step holding the second request writes everything and then raises: that request fails
    with the error, the two beside it finish with their sequential tokens."""
    params = _params()
    expected = _sequential(generator, params)
    real_step = generator.engine.step
    doomed = params[1]

    def step_failing_with_the_second(slots, lengths, step_params, generators):
        outputs = real_step(slots, lengths, step_params, generators)
        if any(p is doomed for p in step_params):
            raise RuntimeError("injected failure of the second request")
        return outputs

    monkeypatch.setattr(generator.engine, "step", step_failing_with_the_second)
    first, second, third = _run_batched(generator, params)
    assert isinstance(second, RuntimeError) and "second request" in str(second)
    assert [first, third] == [expected[0], expected[2]]


def test_a_failure_recording_one_token_fails_that_request_only(generator: Generator, monkeypatch) -> None:
    """After a good step, recording the second request's third token raises: the others' tokens of
    that step are recorded once (not stepped again) and they finish with their sequential tokens."""
    params = _params()
    expected = _sequential(generator, params)
    real_accept = generator.accept
    doomed = params[1]

    def accept_failing(request, token):
        if request.params is doomed and len(request.tokens) == 2:
            raise RuntimeError("injected failure while recording a token")
        return real_accept(request, token)

    monkeypatch.setattr(generator, "accept", accept_failing)
    first, second, third = _run_batched(generator, params)
    assert isinstance(second, RuntimeError) and "recording a token" in str(second)
    assert [first, third] == [expected[0], expected[2]]


def test_a_generator_runs_one_scheduler_at_a_time(generator: Generator) -> None:
    """The scheduler alone hands out the decode state's slots: a second one over the same generator is
    refused until the first is closed."""
    first = BatchScheduler(generator, max_batch=2, max_len=1024)
    try:
        with pytest.raises(RuntimeError, match="already has a running scheduler"):
            BatchScheduler(generator, max_batch=2, max_len=1024)
    finally:
        first.close()
    with BatchScheduler(generator, max_batch=2, max_len=1024) as second:
        assert generator.scheduler is second
    assert generator.scheduler is None


def test_requests_beyond_the_slots_wait_and_keep_their_tokens(generator: Generator) -> None:
    """Three requests submitted at once to a one-slot scheduler run one after another, each with
    exactly its tokens alone, and every slot is free at the end."""
    params = _params()
    expected = _sequential(generator, params)
    with BatchScheduler(generator, max_batch=1, max_len=1024) as scheduler:
        inputs = [generator.prepare(p, []) for p in PROMPTS]
        handles = [scheduler.submit(i, q) for i, q in zip(inputs, params)]
        outcomes = [("".join(handle), handle.request.tokens)[1] for handle in handles]
        assert scheduler.active == 0 and sorted(generator.engine.free_slots) == list(range(generator.engine.slots))
    assert outcomes == expected
    ends = [h.request.started + h.stats.total_seconds for h in handles]
    first_tokens = [h.request.started + h.stats.time_to_first_token for h in handles]
    assert all(first_tokens[k + 1] >= ends[k] for k in range(2)), "two requests held the one slot at once"

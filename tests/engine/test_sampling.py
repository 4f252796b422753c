"""Tests for deepseek_vl2.engine.sampling: parameter checks, logits processing, seeded sampling."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from deepseek_vl2.engine.sampling import (
    _inverse_cdf,
    InvalidSamplingParams,
    SamplingParams,
    apply_repetition_penalty,
    make_generator,
    make_seen_mask,
    process_logits,
    resolve_seed,
    sample_next,
    update_seen,
)
from tools.parity.reference_data import (
    config_case_params,
    expected_outputs,
    expected_processor_tensors,
)

NEG_INF = -math.inf


def params(**overrides) -> SamplingParams:
    """Sampling params with every warper off unless overridden (temperature 1)."""
    values = dict(temperature=1.0, top_p=1.0, top_k=0, repetition_penalty=1.0)
    values.update(overrides)
    return SamplingParams(**values)


def nothing_seen(logits: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(logits, dtype=torch.bool)


def kept(scores: torch.Tensor) -> set[int]:
    """Ids of a 1-row score vector that survive filtering (finite scores)."""
    return set(torch.nonzero(torch.isfinite(scores)).flatten().tolist())


def log_probs(*probabilities: float) -> torch.Tensor:
    return torch.tensor([probabilities], dtype=torch.float64).log().float()


# ----------------------------------------------------------------------------- validation


def test_defaults_are_the_official_demo_values():
    p = SamplingParams()
    assert (p.temperature, p.top_p, p.top_k, p.repetition_penalty, p.max_new_tokens) == (
        0.1, 0.9, 0, 1.1, 2048)
    assert p.seed is None and p.stop == () and not p.is_greedy
    assert SamplingParams(temperature=0).is_greedy


@pytest.mark.parametrize(
    "field, value",
    [
        ("temperature", -0.1), ("temperature", math.nan), ("temperature", math.inf),
        ("temperature", 1e-9), ("temperature", "0.5"),
        ("top_p", 0.0), ("top_p", -0.5), ("top_p", 1.01), ("top_p", math.nan),
        ("top_k", -1), ("top_k", 2.5), ("top_k", True),
        ("repetition_penalty", 0.0), ("repetition_penalty", -1.0),
        ("repetition_penalty", math.inf), ("repetition_penalty", math.nan),
        ("max_new_tokens", 0), ("max_new_tokens", -5), ("max_new_tokens", 10.0),
        ("seed", -1), ("seed", 2**32), ("seed", 1.5),
        ("stop", ("ok", "")), ("stop", (3,)),
    ],
)
def test_validate_rejects_out_of_range_values(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


@pytest.mark.parametrize(
    "field, value",
    [("temperature", 0), ("temperature", 1e-5), ("temperature", 5.0), ("top_p", 1),
     ("top_k", 100000), ("repetition_penalty", 0.5), ("max_new_tokens", 1), ("seed", 0),
     ("seed", 2**32 - 1)],
)
def test_validate_accepts_boundary_values(field, value):
    SamplingParams(**{field: value})


def test_params_stay_valid_after_construction():
    """The engine trusts the type: an instance is checked when made and cannot change afterwards."""
    p = SamplingParams(temperature=0, top_p=1, repetition_penalty=1)
    assert (p.temperature, p.top_p, p.repetition_penalty) == (0.0, 1.0, 1.0)
    assert all(isinstance(v, float) for v in (p.temperature, p.top_p, p.repetition_penalty))
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.temperature = -1.0  # type: ignore[misc]


def test_invalid_params_name_the_field_or_the_callers_name_for_it():
    with pytest.raises(InvalidSamplingParams) as raised:
        SamplingParams(max_new_tokens=0)
    assert raised.value.field == "max_new_tokens" and str(raised.value).startswith("max_new_tokens must be")
    assert raised.value.named({"max_new_tokens": "max_length_tokens"}).startswith("max_length_tokens must be")


def test_stop_accepts_a_single_string_and_lists():
    assert SamplingParams(stop="###").stop == ("###",)
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")
    assert SamplingParams(stop=None).stop == ()


# ----------------------------------------------------------------------------- repetition penalty


def test_repetition_penalty_matches_hand_computation():
    logits = torch.tensor([[2.0, -1.0, 0.5, -3.0, 0.0]])
    seen = torch.tensor([[True, True, False, False, True]])
    assert torch.equal(apply_repetition_penalty(logits, seen, 2.0),
                       torch.tensor([[1.0, -2.0, 0.5, -3.0, 0.0]]))
    # A penalty below 1 encourages repetition, by the same rule.
    assert torch.equal(apply_repetition_penalty(logits, seen, 0.5),
                       torch.tensor([[4.0, -0.5, 0.5, -3.0, 0.0]]))


def test_repetition_penalty_per_row_and_through_process_logits():
    logits = torch.tensor([[3.0, -2.0], [3.0, -2.0]])
    seen = torch.tensor([[True, True], [False, True]])
    scores = process_logits(logits, seen, [params(repetition_penalty=1.5),
                                           params(repetition_penalty=4.0)])
    assert torch.allclose(scores, torch.tensor([[2.0, -3.0], [3.0, -8.0]]))


def test_make_seen_mask_and_update_seen():
    seen = make_seen_mask([[0, 3, 3], torch.tensor([5])], vocab_size=6)
    assert seen.tolist() == [[True, False, False, True, False, False],
                             [False, False, False, False, False, True]]
    update_seen(seen, torch.tensor([1, 5]))
    assert seen.tolist() == [[True, True, False, True, False, False],
                             [False, False, False, False, False, True]]
    with pytest.raises(ValueError):
        make_seen_mask([[6]], vocab_size=6)


def test_greedy_ignores_penalty_unless_asked():
    logits = torch.tensor([[3.0, 2.9, -1.0]])
    seen = torch.tensor([[True, False, False]])
    plain = SamplingParams(temperature=0, repetition_penalty=1.1)
    penalised = SamplingParams(temperature=0, repetition_penalty=1.1, penalize_greedy=True)
    assert sample_next(logits, seen, [plain], [None]).tolist() == [0]
    # 3.0 / 1.1 = 2.727 < 2.9
    assert sample_next(logits, seen, [penalised], [None]).tolist() == [1]
    assert torch.equal(process_logits(logits, seen, [plain]), logits)


def test_greedy_takes_first_index_on_ties():
    logits = torch.tensor([[1.0, 4.0, 4.0, 2.0]])
    greedy = params(temperature=0)
    assert sample_next(logits, nothing_seen(logits), [greedy], [None]).tolist() == [1]


# ----------------------------------------------------------------------------- warpers


def test_temperature_divides_logits():
    logits = torch.tensor([[1.0, -2.0, 0.25]])
    seen = nothing_seen(logits)
    assert torch.equal(process_logits(logits, seen, [params(temperature=0.5)]), logits * 2)
    scores = process_logits(logits, seen, [params(temperature=0.3)])
    assert torch.allclose(scores, logits / 0.3)


def test_top_k_keeps_the_k_largest_and_their_ties():
    logits = torch.tensor([[1.0, 5.0, 3.0, 5.0, 2.0]])
    seen = nothing_seen(logits)
    assert kept(process_logits(logits, seen, [params(top_k=3)])[0]) == {1, 2, 3}
    assert kept(process_logits(logits, seen, [params(top_k=1)])[0]) == {1, 3}  # tie at the k-th
    assert kept(process_logits(logits, seen, [params(top_k=99)])[0]) == {0, 1, 2, 3, 4}
    assert kept(process_logits(logits, seen, [params(top_k=0)])[0]) == {0, 1, 2, 3, 4}


@pytest.mark.parametrize(
    "top_p, expected",
    [(0.7, {0, 1}),         # 0.5 + 0.25 = 0.75 >= 0.7
     (0.8, {0, 1, 2}),      # 0.875 >= 0.8
     (0.4, {0}),            # the top token alone already has 0.5
     (0.001, {0}),          # at least one token is always kept
     (0.95, {0, 1, 2, 3, 4})],
)
def test_top_p_keeps_the_smallest_set_reaching_top_p(top_p, expected):
    logits = log_probs(0.5, 0.25, 0.125, 0.0625, 0.0625)
    assert kept(process_logits(logits, nothing_seen(logits), [params(top_p=top_p)])[0]) == expected


def test_tiny_top_p_keeps_exactly_the_top_token_despite_rounding():
    # With 5000 tokens the float32 cumulative sum often ends below 1 - 1e-7 (as float32); the
    # most likely token must survive anyway.
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(20, 5000, generator=generator)
    scores = process_logits(logits, nothing_seen(logits), [params(top_p=1e-7)] * 20)
    for row, scores_row in zip(logits, scores):
        assert kept(scores_row) == {int(row.argmax())}


def test_top_p_with_ties_follows_the_hugging_face_cut():
    # Four equal tokens have exact probabilities 0.25 and cumulative sums 0.25, 0.5, 0.75, 1.
    logits = torch.zeros(1, 4)
    seen = nothing_seen(logits)
    # 1 - 0.5 = 0.5: tokens whose ascending cumulative sum is <= 0.5 go, so exactly 2 remain;
    # among equal logits the higher ids are kept (stable sort).
    assert kept(process_logits(logits, seen, [params(top_p=0.5)])[0]) == {2, 3}
    assert kept(process_logits(logits, seen, [params(top_p=0.6)])[0]) == {1, 2, 3}
    assert kept(process_logits(logits, seen, [params(top_p=0.25)])[0]) == {3}


def test_top_p_one_removes_nothing_even_zero_probability_tokens():
    logits = torch.tensor([[0.0, -200.0, 5.0]])  # exp(-205) underflows to probability 0
    scores = process_logits(logits, nothing_seen(logits), [params(top_p=1.0)])
    assert torch.equal(scores, logits)


def test_per_row_parameters_in_one_batch():
    logits = log_probs(0.5, 0.25, 0.125, 0.0625, 0.0625).repeat(4, 1)
    rows = [params(top_p=0.7), params(top_k=3), params(), params(temperature=0)]
    scores = process_logits(logits, nothing_seen(logits), rows)
    assert [kept(row) for row in scores] == [{0, 1}, {0, 1, 2}, set(range(5)), set(range(5))]


def test_matches_hugging_face_logits_processors_bit_for_bit():
    hf = pytest.importorskip("transformers.generation.logits_process")
    generator = torch.Generator().manual_seed(1234)
    vocab = 3000
    logits = torch.randn(5, vocab, generator=generator) * 3
    history = torch.randint(0, vocab, (5, 40), generator=generator)
    settings = [(0.7, 0.9, 0, 1.1), (1.3, 0.5, 20, 1.3), (0.1, 1.0, 5, 0.8),
                (1.0, 0.95, 0, 1.0), (2.0, 0.3, 50, 1.5)]
    rows = [params(temperature=t, top_p=p, top_k=k, repetition_penalty=r)
            for t, p, k, r in settings]
    ours = process_logits(logits, make_seen_mask(list(history), vocab), rows)
    for b, (t, p, k, r) in enumerate(settings):
        ids, scores = history[b:b + 1], logits[b:b + 1].clone()
        # generate() adds each processor only when it changes something; this order is HF's.
        if r != 1.0:
            scores = hf.RepetitionPenaltyLogitsProcessor(r)(ids, scores)
        if t != 1.0:
            scores = hf.TemperatureLogitsWarper(t)(ids, scores)
        if k:
            scores = hf.TopKLogitsWarper(k)(ids, scores)
        if p < 1.0:
            scores = hf.TopPLogitsWarper(p)(ids, scores)
        assert torch.equal(ours[b], scores[0]), f"row {b} differs from HF"


# ----------------------------------------------------------------------------- drawing


def draw_many(logits: torch.Tensor, row_params: SamplingParams, seed: int, steps: int) -> list[int]:
    generator, _ = make_generator(seed)
    seen = nothing_seen(logits)
    return [int(sample_next(logits, seen, [row_params], [generator])[0]) for _ in range(steps)]


def test_same_seed_same_samples_and_different_seeds_differ():
    logits = torch.zeros(1, 100)
    first = draw_many(logits, params(), seed=7, steps=30)
    assert draw_many(logits, params(), seed=7, steps=30) == first
    assert draw_many(logits, params(), seed=8, steps=30) != first
    assert len(set(first)) > 10  # it really samples


def test_random_seed_is_reported_and_reproduces():
    generator, seed = make_generator(None)
    again, same_seed = make_generator(seed)
    assert same_seed == seed and 0 <= seed < 2**32
    assert torch.equal(torch.rand(5, generator=generator), torch.rand(5, generator=again))
    assert resolve_seed(12) == 12


def test_a_row_does_not_depend_on_its_batch_neighbours():
    torch.manual_seed(0)
    vocab, steps = 50, 40
    target = params(temperature=0.8, top_p=0.9)
    logits_per_step = [torch.randn(4, vocab) for _ in range(steps)]

    alone_gen, _ = make_generator(42)
    alone = [int(sample_next(step[:1], nothing_seen(step[:1]), [target], [alone_gen])[0])
             for step in logits_per_step]

    generators = [make_generator(42)[0], make_generator(1)[0], None, make_generator(3)[0]]
    neighbours = [target, params(temperature=1.5, top_k=5), params(temperature=0), params()]
    batched = [int(sample_next(step, nothing_seen(step), neighbours, generators)[0])
               for step in logits_per_step]
    assert batched == alone


def test_sampling_frequencies_match_the_distribution():
    probabilities = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probabilities.log().unsqueeze(0)
    n = 4000
    counts = torch.bincount(torch.tensor(draw_many(logits, params(), seed=2024, steps=n)),
                            minlength=4).double()
    sigma = (n * probabilities.double() * (1 - probabilities.double())).sqrt()
    assert ((counts - n * probabilities.double()).abs() <= 4 * sigma).all(), counts


def test_frequencies_after_temperature_and_top_p():
    # temperature 0.5 squares the probabilities: 0.25, 0.09, 0.0225, 0.0025 (sum 0.365);
    # top_p 0.8 then keeps the first two (0.685 + 0.247 >= 0.8): renormalised 0.735 / 0.265.
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    draws = torch.tensor(draw_many(logits, params(temperature=0.5, top_p=0.8), seed=5, steps=3000))
    counts = torch.bincount(draws, minlength=4).double()
    assert counts[2] == 0 and counts[3] == 0
    expected = 3000 * 0.25 / 0.34
    assert abs(counts[0] - expected) <= 4 * math.sqrt(3000 * 0.735 * 0.265)


def test_removed_and_impossible_tokens_are_never_drawn():
    logits = torch.tensor([[NEG_INF, 0.0, 0.0, NEG_INF, -1e4]])
    draws = set(draw_many(logits, params(), seed=3, steps=500))
    assert draws == {1, 2}
    assert set(draw_many(torch.tensor([[1.0, 3.0, 2.0]]), params(top_k=1), seed=3, steps=50)) == {1}


def test_a_draw_at_the_very_top_never_picks_a_zero_probability_token():
    probs = torch.tensor([[0.25, 0.75, 0.0, 0.0]])
    assert _inverse_cdf(probs, torch.tensor([[1.0]], dtype=torch.float64)).tolist() == [1]
    assert _inverse_cdf(probs, torch.tensor([[0.0]], dtype=torch.float64)).tolist() == [0]
    assert _inverse_cdf(probs, torch.tensor([[0.25]], dtype=torch.float64)).tolist() == [1]


def test_sampled_row_needs_a_generator_greedy_row_does_not():
    logits = torch.randn(2, 10)
    rows = [params(), params(temperature=0)]
    with pytest.raises(ValueError, match="generator"):
        sample_next(logits, nothing_seen(logits), rows, [None, None])
    tokens = sample_next(logits, nothing_seen(logits), rows, [make_generator(0)[0], None])
    assert tokens.dtype == torch.long and tokens.shape == (2,)
    assert tokens[1] == logits[1].argmax()


# ----------------------------------------------------------------------------- reference fixtures


@pytest.mark.parametrize("config, case", config_case_params(require_outputs=True))
def test_greedy_with_and_without_penalty_matches_the_reference(config, case):
    """Replays the reference's greedy runs from its recorded step logits.

    The plain and the repetition-penalty runs share their raw logits for as long as their tokens
    agree, so every step up to and including the first divergence can be checked.
    """
    tensors, meta = expected_outputs(config, case)
    prompt_ids = expected_processor_tensors(case)["input_ids"]
    step_logits = tensors["greedy_step_logits"]  # [n_new, V], raw, from the plain greedy run
    plain = meta["greedy"]["new_tokens"]
    penalised_run = meta["greedy_repetition_penalty_1.1"]
    penalised = penalised_run["new_tokens"]

    greedy = SamplingParams(temperature=0)
    with_penalty = SamplingParams(temperature=0, repetition_penalty=1.1,
                                  penalize_greedy=True)
    vocab = step_logits.shape[-1]
    for step, expected in enumerate(plain):
        logits = step_logits[step:step + 1]
        assert int(sample_next(logits, nothing_seen(logits), [greedy], [None])[0]) == expected

    shared = 0
    while shared < min(len(plain), len(penalised)) and plain[shared] == penalised[shared]:
        shared += 1
    last_step = min(shared, len(plain) - 1, len(penalised) - 1)
    seen = make_seen_mask([prompt_ids], vocab)
    for step in range(last_step + 1):
        logits = step_logits[step:step + 1]
        token = sample_next(logits, seen, [with_penalty], [None])
        assert int(token[0]) == penalised[step], f"step {step}"
        scores = process_logits(logits, seen, [with_penalty])[0]
        top5 = torch.tensor([value for _, value in penalised_run["step_top5"][step]])
        assert torch.allclose(scores.topk(5).values, top5, atol=1e-5)
        update_seen(seen, token)

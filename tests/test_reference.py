"""Comparison against the reference fixtures produced by the official DeepSeek-VL2 code.

Sections:
  * shared helpers (cached per config; reuse them in later sections)
  * processor: prompt string, tokens, masks, crops and image tiles for every (config, case)
  * (model sections are added below by the model work)

Fixtures are found through reference_data (DSVL2_REFERENCE_DIR); every test skips with a reason
naming that variable when they are absent.
"""

from __future__ import annotations

import functools

import pytest
import torch

from reference_data import (
    case_meta,
    checkpoint_dir,
    config_case_params,
    expected_processor_tensors,
    expected_tiles,
    load_case_inputs,
    reference_dir,
)

from deepseek_vl2.inputs.processor import DeepseekVL2Processor, ProcessedInputs

# ============================================================================ shared helpers


@functools.lru_cache(maxsize=None)
def _processor_cached(root: str, config: str) -> DeepseekVL2Processor:
    return DeepseekVL2Processor.from_pretrained(checkpoint_dir(config))


def processor_for(config: str) -> DeepseekVL2Processor:
    """The processor of a config's checkpoint (loaded once per session)."""
    return _processor_cached(str(reference_dir()), config)


@functools.lru_cache(maxsize=None)
def _processed_cached(root: str, config: str, case: str) -> ProcessedInputs:
    conversation, images = load_case_inputs(case)
    return processor_for(config).process(conversation, images, system_prompt="")


def processed_case(config: str, case: str) -> ProcessedInputs:
    """Our processor's output for a case with a config's checkpoint (computed once per session).

    Callers must not modify the returned tensors.
    """
    return _processed_cached(str(reference_dir()), config, case)


# ============================================================================ processor

CONFIG_CASES = config_case_params()


@pytest.mark.parametrize("config, case", CONFIG_CASES)
def test_processor_prompt_and_tokens(config: str, case: str) -> None:
    """sft_format, input_ids, images_seq_mask, crops and image-token counts are identical."""
    meta = case_meta(case)
    expected = expected_processor_tensors(case)
    ours = processed_case(config, case)

    assert ours.prompt == meta["sft_format"]
    assert ours.input_ids.dtype == torch.int64
    assert torch.equal(ours.input_ids, expected["input_ids"])
    assert ours.images_seq_mask.dtype == torch.bool
    assert torch.equal(ours.images_seq_mask, expected["images_seq_mask"])
    assert ours.images_spatial_crop.dtype == torch.int64
    assert torch.equal(ours.images_spatial_crop, expected["images_spatial_crop"])
    assert ours.num_image_tokens == meta["num_image_tokens"]
    assert processor_for(config).image_token_id == meta["image_token_id"]


@pytest.mark.parametrize("config, case", CONFIG_CASES)
def test_processor_image_tiles(config: str, case: str) -> None:
    """The image tensor equals the reference tiles (one all-zero tile for text-only cases)."""
    meta = case_meta(case)
    expected = expected_tiles(case)
    ours = processed_case(config, case)

    assert ours.images.dtype == torch.float32
    assert tuple(ours.images.shape) == tuple(meta["images_shape"][1:])
    torch.testing.assert_close(ours.images, expected, atol=1e-6, rtol=0)
    if not meta["tile_png_files"]:
        assert not ours.images.any()
    # float64 checksums recorded by the reference generator
    assert ours.images.double().sum().item() == pytest.approx(meta["images_sum"], abs=1e-3)
    assert ours.images.double().square().sum().item() == pytest.approx(meta["images_sq_sum"], abs=1e-3)


# ============================================================================ model
# Stage outputs, logits, teacher-forced log-probs and greedy continuations against
# outputs/<config>/<case>.{safetensors,json}. Tolerances are the fixture README's suggestions.

from deepseek_vl2.model.checkpoint import load_model  # noqa: E402
from deepseek_vl2.engine.generation import Generator  # noqa: E402
from deepseek_vl2.engine.sampling import SamplingParams  # noqa: E402
from reference_data import expected_outputs  # noqa: E402

STAGE_TOL = dict(atol=1e-5, rtol=1e-5)  # vision_tile0, projector_tile0, inputs_embeds
LOGIT_TOL = dict(atol=1e-4, rtol=1e-4)  # hidden_states_probe, logits_last4, greedy_step_logits
LOGPROB_ATOL = 1e-4
ROUTING_NEAR_TIE = 1e-5


@functools.lru_cache(maxsize=None)
def _generator_cached(root: str, config: str) -> Generator:
    model = load_model(checkpoint_dir(config), device="cpu", dtype=torch.float32)
    return Generator(model, processor_for(config))


def generator_for(config: str) -> Generator:
    """Model (float32, CPU) + processor of a config, loaded once per session."""
    return _generator_cached(str(reference_dir()), config)


@functools.lru_cache(maxsize=4)
def _full_forward_cached(root: str, config: str, case: str):
    gen = generator_for(config)
    inputs = processed_case(config, case)
    with torch.inference_mode():
        embeds = gen.model.embed_inputs(
            inputs.input_ids, inputs.images, inputs.images_seq_mask, inputs.images_spatial_crop
        )
        hidden: list[torch.Tensor] = []  # each layer's input (HF output_hidden_states), then the final norm's output
        hooks = [layer.register_forward_pre_hook(lambda _module, args: hidden.append(args[0]))
                 for layer in gen.model.language.model.layers]
        positions = torch.arange(embeds.shape[0]).unsqueeze(0)
        try:
            final = gen.model.language.hidden_states(embeds.unsqueeze(0), positions)
        finally:
            for hook in hooks:
                hook.remove()
        hidden.append(final)
        logits = gen.model.language.logits(final)[0]
    return embeds, [h[0] for h in hidden], logits


def full_forward(config: str, case: str):
    """(inputs_embeds [T, D], per-layer hidden states, logits [T, V]) of one uncached forward."""
    return _full_forward_cached(str(reference_dir()), config, case)


def _assert_close(name: str, actual: torch.Tensor, expected: torch.Tensor, tol: dict) -> None:
    diff = (actual.float() - expected.float()).abs().max().item()
    assert torch.allclose(actual.float(), expected.float(), **tol), f"{name}: max abs diff {diff:.3g} exceeds {tol}"


@pytest.mark.parametrize(("config", "case"), config_case_params(require_outputs=True))
def test_vision_and_projector_match(config: str, case: str) -> None:
    expected, _ = expected_outputs(config, case)
    if "vision_tile0" not in expected:
        pytest.skip(f"{case} has no image: the vision tower does not run")
    gen = generator_for(config)
    inputs = processed_case(config, case)
    with torch.inference_mode():
        features = gen.model.vision.forward_features(inputs.images[:1])
        projected = gen.model.projector(features)
    _assert_close("vision_tile0", features[0], expected["vision_tile0"], STAGE_TOL)
    _assert_close("projector_tile0", projected[0], expected["projector_tile0"], STAGE_TOL)


@pytest.mark.parametrize(("config", "case"), config_case_params(require_outputs=True))
def test_embeddings_hidden_states_and_logits_match(config: str, case: str) -> None:
    expected, _ = expected_outputs(config, case)
    embeds, hidden, logits = full_forward(config, case)
    _assert_close("inputs_embeds", embeds, expected["inputs_embeds"], STAGE_TOL)
    probe = expected["probe_positions"]
    reference_hidden = expected["hidden_states_probe"]
    assert len(hidden) == reference_hidden.shape[0]
    for layer, states in enumerate(hidden):
        _assert_close(f"hidden_states[{layer}]", states[probe], reference_hidden[layer], LOGIT_TOL)
    _assert_close("logits_last4", logits[-4:], expected["logits_last4"], LOGIT_TOL)


@pytest.mark.parametrize(("config", "case"), config_case_params(require_outputs=True))
def test_teacher_forced_logprobs_match(config: str, case: str) -> None:
    expected, _ = expected_outputs(config, case)
    _, _, logits = full_forward(config, case)
    ids = processed_case(config, case).input_ids
    logprobs = torch.log_softmax(logits[:-1], dim=-1).gather(1, ids[1:].unsqueeze(1)).squeeze(1)
    reference = expected["teacher_forced_logprobs"]
    margin = expected["moe_routing_margin"]
    # Positions at an expert-selection near-tie (and the one after) may legitimately differ.
    near_tie = margin < ROUTING_NEAR_TIE
    checked = ~(near_tie[:-1] | torch.cat([torch.tensor([False]), near_tie[:-2]]))
    diff = (logprobs - reference).abs()
    assert checked.sum() >= len(checked) - 6, "too many routing near-ties to compare log-probs"
    assert diff[checked].max().item() <= LOGPROB_ATOL, f"max log-prob diff {diff[checked].max().item():.3g}"


def _greedy_run(config: str, case: str, penalty: float, chunk: int | None = None):
    """Greedy decode as the fixture did; returns (new token ids, per-step logits [n, V])."""
    gen = generator_for(config)
    _, meta = expected_outputs(config, case)
    n_new = meta["greedy"]["n_new"]
    params = SamplingParams(temperature=0.0, repetition_penalty=penalty, penalize_greedy=penalty != 1.0,
                            max_new_tokens=n_new, stop=())
    seq = gen.new_sequence(processed_case(config, case), params)
    cache = gen.model.new_cache(1, seq.stats.prompt_tokens + n_new)
    gen.prefill(seq, cache, chunk)
    step_logits = [seq.next_logits]
    gen.sample([seq], seq.next_logits.unsqueeze(0))
    while not seq.finished:
        logits = gen.decode_logits([seq], cache)
        step_logits.append(logits[0])
        gen.sample([seq], logits)
    return seq.tokens, torch.stack(step_logits)


@pytest.mark.parametrize(("config", "case"), config_case_params(require_outputs=True))
def test_greedy_continuation_matches(config: str, case: str) -> None:
    expected, meta = expected_outputs(config, case)
    tokens, step_logits = _greedy_run(config, case, penalty=1.0)
    assert tokens == meta["greedy"]["new_tokens"]
    reference = expected["greedy_step_logits"]
    _assert_close("greedy_step_logits", step_logits[: len(reference)], reference, LOGIT_TOL)


@pytest.mark.parametrize(("config", "case"), config_case_params(require_outputs=True))
def test_greedy_with_repetition_penalty_matches(config: str, case: str) -> None:
    _, meta = expected_outputs(config, case)
    key = "greedy_repetition_penalty_1.1"
    if key not in meta:
        pytest.skip(f"{case}/{config} has no {key} entry")
    tokens, _ = _greedy_run(config, case, penalty=1.1)
    assert tokens == meta[key]["new_tokens"]


@pytest.mark.parametrize(("config", "case"), config_case_params(require_outputs=True))
def test_incremental_prefill_matches(config: str, case: str) -> None:
    expected, meta = expected_outputs(config, case)
    entry = meta.get("incremental_prefilling")
    if not entry:
        pytest.skip(f"{case}/{config} has no incremental_prefilling entry")
    tokens, step_logits = _greedy_run(config, case, penalty=1.0, chunk=entry["chunk_size"])
    assert tokens == entry["new_tokens"]
    _assert_close("chunked step logits", step_logits[: len(expected["greedy_step_logits"])],
                  expected["greedy_step_logits"], LOGIT_TOL)

"""The MoE routing hook: ``Routing`` records each MoE layer's expert choice and replays it."""
from __future__ import annotations

import functools

import pytest
import torch

from deepseek_vl2.model.moe import MoE, Routing
from tools.random_model import build_random_model


@functools.lru_cache(maxsize=None)
def _model(variant: str):
    model, _ = build_random_model(variant, torch.device("cpu"), torch.float32, size="reduced", layers=3,
                                  vision_layers=1, seed=3)
    return model


def _inputs(model, seed: int, length: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.language.vocab_size, (1, length), generator=generator)
    return model.language.model.embed_tokens(ids), torch.arange(length).unsqueeze(0)


@pytest.mark.parametrize("variant", ["tiny", "base"])  # greedy softmax routing; group-limited routing
@torch.no_grad()
def test_record_then_replay_gives_identical_outputs(variant: str) -> None:
    model = _model(variant)
    embeds, positions = _inputs(model, seed=0)
    plain = model.forward_embeds(embeds, positions)
    recorded = Routing()
    logits = model.forward_embeds(embeds, positions, routing=recorded)
    n_moe = sum(isinstance(layer.mlp, MoE) for layer in model.language.model.layers)
    top_k = model.config.language.num_experts_per_tok
    assert n_moe >= 2 and len(recorded.chosen) == n_moe
    assert all(ids.shape == (embeds.shape[1], top_k) for ids in recorded.chosen)
    assert torch.equal(logits, plain)  # recording changes nothing
    replay = Routing(forced=recorded.chosen)
    assert torch.equal(model.forward_embeds(embeds, positions, routing=replay), plain)
    assert all(torch.equal(a, b) for a, b in zip(replay.chosen, recorded.chosen))


@torch.no_grad()
def test_replaying_another_runs_choice_changes_the_ids_used() -> None:
    model = _model("tiny")
    first, positions = _inputs(model, seed=1)
    second, _ = _inputs(model, seed=2)
    first_routing, second_routing = Routing(), Routing()
    model.forward_embeds(first, positions, routing=first_routing)
    second_logits = model.forward_embeds(second, positions, routing=second_routing)
    assert any(not torch.equal(a, b) for a, b in zip(first_routing.chosen, second_routing.chosen))
    forced = Routing(forced=first_routing.chosen)
    forced_logits = model.forward_embeds(second, positions, routing=forced)
    assert all(torch.equal(a, b) for a, b in zip(forced.chosen, first_routing.chosen))
    assert not torch.allclose(forced_logits, second_logits)


@torch.no_grad()
def test_forced_ids_of_the_wrong_shape_are_refused() -> None:
    model = _model("tiny")
    embeds, positions = _inputs(model, seed=0)
    recorded = Routing()
    model.forward_embeds(embeds, positions, routing=recorded)
    with pytest.raises(ValueError, match="forced ids of MoE layer 0"):
        model.forward_embeds(embeds[:, :5], positions[:, :5], routing=Routing(forced=recorded.chosen))

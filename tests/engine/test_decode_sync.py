"""The decode step never reads a device value on the host.

Every host synchronisation in PyTorch goes through an op that copies a value to Python
(`aten._local_scalar_dense`: `.item()`, `int()`, `.tolist()`) or produces a data-dependent shape
(`nonzero`, `masked_select`, boolean indexing, `unique`). A dispatch mode records every op the
decode step runs; none of those may appear — on the CPU here, so that the same step makes no
hidden sync on a GPU either.
"""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from deepseek_vl2.engine.generation import Generator
from deepseek_vl2.engine.sampling import SamplingParams, sample_next
from deepseek_vl2.model import moe

SYNCING_OPS = ("_local_scalar_dense", "nonzero", "masked_select", "unique", "bincount", "item")


class OpRecorder(TorchDispatchMode):
    """Records the name of every aten op dispatched while active."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.__name__ if hasattr(func, "__name__") else str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("batch", [1, 6])  # 6 × top-k exceeds the 8 experts: some read twice
def test_decode_step_and_sampling_do_not_sync(generator: Generator, batch: int, monkeypatch) -> None:
    generator.reserve(batch, 64)
    params = [SamplingParams(temperature=0.7 if b % 2 else 0.0, top_k=5, seed=b) for b in range(batch)]
    seqs = []
    for b in range(batch):
        seq = generator.new_request(generator.prepare(f"Hello number {b}", []), params[b])
        generator.admit(seq)
        while not generator.prefill_step(seq):
            pass
        generator.sample([seq], seq.next_logits.unsqueeze(0))
        seqs.append(seq)
    # The path a GPU takes: the CPU's eager MoE loops over experts on the host
    # (moe.reads_ids_on_host), a GPU's does not. Tensor.tolist reads CPU memory without
    # dispatching an op, so it is recorded by hand (on a GPU it is a synchronisation).
    monkeypatch.setattr(moe, "reads_ids_on_host", lambda x: False)
    listed = []
    original_tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: listed.append(self.shape) or original_tolist(self))
    try:
        recorder = OpRecorder()
        with recorder:
            tokens, logits = generator.decode_step(seqs)  # rows written, uniforms drawn, step run
            again, _ = generator.decode_step(seqs)
        assert not listed, f"Tensor.tolist in the decode step (a host sync on a GPU): {listed}"
        assert tokens.shape[0] >= batch and logits.shape[0] == tokens.shape[0]
        assert len(recorder.ops) > 50, "the recorder must see the step's ops"
        syncing = sorted({op for op in recorder.ops if any(name in op for name in SYNCING_OPS)})
        assert not syncing, f"host-synchronising ops in the decode step: {syncing}"
    finally:
        for seq in seqs:
            generator.release(seq)


def test_first_token_sampling_does_not_sync(generator: Generator) -> None:
    seq = generator.new_request(generator.prepare("Hello", []), SamplingParams(temperature=0.7, top_p=0.8, seed=1))
    logits = torch.randn(2, generator.model.config.language.vocab_size)
    seen = torch.cat([seq.seen, seq.seen])
    recorder = OpRecorder()
    with recorder:
        sample_next(logits, seen, [seq.params, SamplingParams(temperature=0.0)], [seq.generator, None])
    syncing = sorted({op for op in recorder.ops if any(name in op for name in SYNCING_OPS)})
    assert not syncing, f"host-synchronising ops in sampling: {syncing}"


def test_recorder_catches_a_sync() -> None:
    recorder = OpRecorder()
    with recorder:
        int(torch.tensor([3]).sum())
    assert any("_local_scalar_dense" in op for op in recorder.ops)

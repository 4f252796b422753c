"""A prefix-cache bug the bf16 check of a cached turn must report, as a context manager that
injects it into a :class:`~deepseek_vl2.engine.generation.Generator`
(tests/parity/test_bf16_prefix_cache.py).

It leaves a request that reuses nothing as it is: only the part computed after reused KV is wrong.
(KV reused one position too far — one stale entry among the ~440 a turn after an image attends
to — adds about bf16's own rounding and is caught in only some conversations, docs/correctness.md:
a float32 comparison sees it.)
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from deepseek_vl2.engine.generation import Generator
from deepseek_vl2.inputs.processor import ProcessedInputs


@contextlib.contextmanager
def embeds_shifted_by_one(generator: Generator) -> Iterator[None]:
    """The prefill after reused KV embeds the prompt from one position early: every position it
    computes holds the previous token (at its own rotary position)."""
    original = generator._embed_from

    def shifted(inputs: ProcessedInputs, start: int) -> torch.Tensor:
        if start == 0:
            return original(inputs, start)
        return original(inputs, start - 1)[:-1]

    generator._embed_from = shifted
    try:
        yield
    finally:
        del generator._embed_from


"""The three routed-expert paths (grouped prefill, fused and looped decode) equal the references."""
from __future__ import annotations

import pytest
import torch

from deepseek_vl2.model.moe import StackedExperts
from tools.parity.moe_reference import dense, gathered


@pytest.mark.parametrize(("tokens", "k"), [(1, 2), (5, 3), (9, 4)])  # 9 × 4 > 16 experts: some chosen twice
def test_every_path_equals_both_references(tokens: int, k: int) -> None:
    torch.manual_seed(tokens)
    stack = StackedExperts(16, 64, 48)
    with torch.no_grad():
        stack.gate_up.normal_(0, 0.1)
        stack.down.normal_(0, 0.1)
    x = torch.randn(tokens, 64)
    ids = torch.stack([torch.randperm(16)[:k] for _ in range(tokens)])
    with torch.inference_mode():
        reference = gathered(stack, x, ids)
        torch.testing.assert_close(dense(stack, x, ids), reference, atol=1e-5, rtol=1e-5)
        for path in (stack.grouped, stack.looped, stack.fused):
            torch.testing.assert_close(path(x, ids), reference, atol=1e-5, rtol=1e-5)

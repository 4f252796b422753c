"""The bf16 check's noise allowance and its flip-free prefix, on synthetic errors.

The allowance (tools/parity/bf16_bounds.noise_allowance) claims that a correct run — bf16 squared
errors an independent draw of the float32 ones' distribution, scaled by 2^32 — exceeds it with
probability ≈ 0.13 %. Simulated here with per-position squared errors that are sums of squares of
a few Gaussian components (chi-square, as a logit error over a small hidden width is).
"""
from __future__ import annotations

import math

import torch

from tools.parity.bf16_bounds import PRECISION_RATIO, Bf16Runs, bf16_figures, bf16_problems, noise_allowance

TRIALS = 2000


def _squared_errors(generator: torch.Generator, positions: int, components: int) -> torch.Tensor:
    """[TRIALS, positions] sums of squares of ``components`` standard normals, per position."""
    return torch.randn(TRIALS, positions, components, generator=generator, dtype=torch.float64).pow(2).sum(-1)


def test_a_correct_run_rarely_exceeds_its_allowance() -> None:
    generator = torch.Generator().manual_seed(0)
    for positions, components in ((24, 4), (60, 16), (440, 8)):
        float32_sq = _squared_errors(generator, positions, components)
        bf16_sq = _squared_errors(generator, positions, components)  # equal expectation: ratio 1 on average
        ratios = (bf16_sq.sum(-1) / float32_sq.sum(-1)).sqrt()
        allowed = torch.tensor([noise_allowance(row) for row in float32_sq])
        exceeded = (ratios > allowed).double().mean().item()
        assert exceeded < 0.01, (positions, components, exceeded)  # 0.13 % expected; 1 % leaves sampling room
        # and the allowance is no wider than it needs to be: a 3-standard-error margin, not 6
        assert (ratios > allowed.log().mul(0.5).exp()).double().mean().item() > 0.01, (positions, components)


def test_the_allowance_narrows_with_more_positions() -> None:
    generator = torch.Generator().manual_seed(1)
    short = noise_allowance(_squared_errors(generator, 32, 8)[0])
    long = noise_allowance(_squared_errors(generator, 2048, 8)[0])
    assert 1 < long < short
    assert math.isinf(noise_allowance(torch.ones(1)))


def _runs(free_error: torch.Tensor, flipped_at: int) -> Bf16Runs:
    """Runs over 64 positions × 32 logits: float32 error 1e-6, held at 2^16 × that, the free run
    with ``free_error`` added per position, and one MoE layer's choice changed at ``flipped_at``."""
    generator = torch.Generator().manual_seed(2)
    exact = torch.randn(64, 32, generator=generator, dtype=torch.float64)
    noise = lambda: torch.randn(64, 32, generator=generator, dtype=torch.float64) * 1e-6  # noqa: E731
    held = exact + PRECISION_RATIO * 0.7 * noise()
    ids_f32 = torch.zeros(64, 2, dtype=torch.long)
    ids_free = ids_f32.clone()
    ids_free[flipped_at] = torch.tensor([3, 4])
    return Bf16Runs(f32=exact + noise(), f64=exact, held=held, free=held + free_error.unsqueeze(-1) * noise(),
                    gate_f32=None, gate_f64=None, gate_free=None, routing_f32=[ids_f32], routing_free=[ids_free])


def test_bound_2_reads_only_the_positions_before_the_first_flip() -> None:
    after_the_flip = torch.zeros(64, dtype=torch.float64)
    after_the_flip[40:] = 1e6  # order-1 moves after a flip at 40: attention carries them
    figures = bf16_figures(_runs(after_the_flip, flipped_at=40))
    assert figures["free_prefix_positions"] == 40 and bf16_problems(figures) == []
    before_the_flip = torch.zeros(64, dtype=torch.float64)
    before_the_flip[:40] = PRECISION_RATIO  # 2^16 x float32's error again, on top of bf16's own
    problems = bf16_problems(bf16_figures(_runs(before_the_flip, flipped_at=40)))
    assert len(problems) == 1 and "before the first changed expert choice" in problems[0], problems

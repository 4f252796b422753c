"""Scores that came out NaN or infinite (a numerical overflow, damaged weights): no token can be
chosen from them. The sampler marks such a row with `NON_FINITE_TOKEN` on the device, without a
host synchronisation; the text streamer, where the ids are read on the host, turns the mark into
`NonFiniteLogitsError`, which fails that request alone while the server goes on serving.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# The id of a row whose logits hold NaN or +inf, or no finite value. Outside the vocabulary:
# only `update_seen` and the streamer ever see it.
NON_FINITE_TOKEN = -1


class NonFiniteLogitsError(RuntimeError):
    """The model's scores for a request came out NaN or infinite: that request fails, the others go on."""

    def __init__(self) -> None:
        super().__init__("the model produced NaN or infinite scores for this request (a numerical overflow "
                         "or damaged weights), so no next token could be chosen. The server keeps serving: "
                         "retry, and report the prompt if it happens again")


def mark_non_finite(tokens: "torch.Tensor", logits: "torch.Tensor") -> "torch.Tensor":
    """``tokens`` [B] with `NON_FINITE_TOKEN` in each row whose ``logits`` [B, V] hold NaN or +inf
    or no finite value (the row maximum is then not finite): one reduction, no host sync."""
    return tokens.where(logits.amax(dim=-1).isfinite(), NON_FINITE_TOKEN)

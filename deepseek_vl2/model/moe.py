"""Feed-forward blocks of the DeepSeek-V2 decoder: SwiGLU MLP, the MoE gate, and the MoE layer.

Routed experts are stored stacked ([E, 2·I, D] gate+up and [E, D, I] down). Decode (one token
per sequence) never loops over experts in Python nor reads a device value on the host:

* compiled (the decode engine's step): :meth:`StackedExperts.run_indexed`, a multiply-reduce
  over the chosen experts' weights that Inductor fuses with the gather — every chosen expert's
  weights are read once, in place, and copied nowhere;
* eager on the CPU: :meth:`StackedExperts.run_looped` (one matrix-vector product per chosen
  expert and token, reading its weights in place; the host is the device, so reading the ids
  costs nothing — 3× to 10× faster than gathering, measured in docs/engine.md);
* eager on a GPU: :meth:`StackedExperts.run_gathered` (gathers the chosen weights, then batched
  matmuls, with no host synchronisation);
* decode batches choosing more experts than exist: :meth:`StackedExperts.run_dense` (every
  expert once, on every token).

Prefill, with many tokens per expert, loops over the experts that received tokens (one host
sync per layer for the token counts).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .config import LanguageConfig


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) · up(x))."""

    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Gate(nn.Module):
    """Chooses top-k experts per token; returns (weights [N, k] float32, expert ids [N, k])."""

    def __init__(self, config: LanguageConfig) -> None:
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.n_experts = config.n_routed_experts
        self.method = config.topk_method
        self.scoring = config.scoring_func
        self.n_group = config.n_group or 1
        self.topk_group = config.topk_group or 1
        self.normalise = config.norm_topk_prob
        self.scaling = config.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(self.n_experts, config.hidden_size))
        if self.method == "noaux_tc":
            self.e_score_correction_bias = nn.Parameter(torch.empty(self.n_experts))

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """Expert scores [N, E] in float32 (softmax or sigmoid of the gate logits)."""
        logits = F.linear(x.to(torch.float32), self.weight.to(torch.float32))
        return logits.softmax(dim=-1) if self.scoring == "softmax" else logits.sigmoid()

    def _keep_groups(self, choice: torch.Tensor, group_score: torch.Tensor) -> torch.Tensor:
        """Zero the experts outside the topk_group best groups (0.0, not -inf, as the reference)."""
        n = choice.shape[0]
        kept = group_score.topk(self.topk_group, dim=-1, sorted=False).indices  # [N, topk_group]
        group_mask = torch.zeros_like(group_score).scatter_(1, kept, 1.0)
        expert_mask = group_mask.unsqueeze(-1).expand(n, self.n_group, self.n_experts // self.n_group)
        return choice.masked_fill(expert_mask.reshape(n, -1) == 0, 0.0)

    def choose(self, scores: torch.Tensor) -> torch.Tensor:
        """Expert ids [N, k] chosen from scores [N, E] by the configured top-k method."""
        if self.method == "greedy":
            return scores.topk(self.top_k, dim=-1, sorted=False).indices
        n = scores.shape[0]
        if self.method == "noaux_tc":
            choice = scores + self.e_score_correction_bias.to(torch.float32).unsqueeze(0)
            group_score = choice.view(n, self.n_group, -1).topk(2, dim=-1).values.sum(-1)
        else:  # group_limited_greedy
            choice = scores
            group_score = choice.view(n, self.n_group, -1).max(dim=-1).values
        choice = self._keep_groups(choice, group_score)
        return choice.topk(self.top_k, dim=-1, sorted=False).indices

    def forward(
        self, x: torch.Tensor, forced_ids: Optional[torch.Tensor] = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights [N, k] float32, ids [N, k]) for tokens x [N, D]; ``forced_ids`` replaces the
        choice, the weights still being this gate's scores at those ids, normalised and scaled."""
        scores = self.scores(x)
        ids = self.choose(scores) if forced_ids is None else forced_ids.to(scores.device)
        weights = scores.gather(1, ids)
        if self.top_k > 1 and self.normalise:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.scaling, ids


class Routing:
    """Expert choices of one forward pass.

    ``Routing()`` records: after the forward, ``.chosen[i]`` is the ids [N, k] the i-th MoE layer
    called chose. ``Routing(forced=recorded.chosen)`` replays: MoE layer i uses ``forced[i]`` as its
    ids (weights still come from its own gate's scores at those ids, normalised and scaled as
    usual), and records them too. Pass one instance per forward pass; it is not for compiled code.
    """

    def __init__(self, forced: Optional[list[torch.Tensor]] = None) -> None:
        self.forced = forced
        self.chosen: list[torch.Tensor] = []

    def choose(self, gate: Gate, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the next MoE layer's gate on x [N, D], forcing its ids when replaying; records them."""
        layer = len(self.chosen)
        forced = None
        if self.forced is not None:
            if layer >= len(self.forced):
                raise ValueError(f"the forced routing has {len(self.forced)} MoE layers; layer {layer} was called")
            forced = self.forced[layer]
            expected = (x.shape[0], gate.top_k)
            if tuple(forced.shape) != expected:
                raise ValueError(f"forced ids of MoE layer {layer} are {tuple(forced.shape)}, expected {expected}")
        weights, ids = gate(x, forced)
        self.chosen.append(ids.detach())
        return weights, ids


class StackedExperts(nn.Module):
    """All routed experts' SwiGLU weights in two stacked tensors."""

    def __init__(self, n_experts: int, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.intermediate = intermediate
        self.gate_up = nn.Parameter(torch.empty(n_experts, 2 * intermediate, hidden))
        self.down = nn.Parameter(torch.empty(n_experts, hidden, intermediate))

    def run_gathered(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """x [N, D], ids [N, k] → expert outputs [N, k, D], gathering the chosen experts' weights."""
        n, k = ids.shape
        flat_ids = ids.reshape(-1)
        inputs = x.repeat_interleave(k, dim=0).unsqueeze(-1)  # [N·k, D, 1]
        gate, up = torch.bmm(self.gate_up[flat_ids], inputs).squeeze(-1).split(self.intermediate, dim=-1)
        hidden = (F.silu(gate) * up).unsqueeze(-1)  # [N·k, I, 1]
        return torch.bmm(self.down[flat_ids], hidden).view(n, k, -1)

    def run_looped(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Same result as run_gathered: for each token and each of its experts, two matrix-vector
        products on that expert's weights in place (no copy). Every product has one row, so a
        token's result does not depend on the other tokens in the batch. Reads ids on the host."""
        out = x.new_empty(*ids.shape, x.shape[-1])  # [N, k, D]
        for row, experts in enumerate(ids.tolist()):
            token = x[row : row + 1]
            for slot, expert in enumerate(experts):
                gate, up = F.linear(token, self.gate_up[expert]).split(self.intermediate, dim=-1)
                out[row, slot] = F.linear(F.silu(gate) * up, self.down[expert])[0]
        return out

    def run_indexed(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Same result as run_gathered, written as gather → multiply → float32 sum.

        Eagerly this would materialise the gathered weights (and more); under ``torch.compile``
        Inductor turns each projection into one reduction kernel that loads
        ``gate_up[ids[r], i, :]`` / ``down[ids[r], o, :]`` straight from the stacked tensor: the
        chosen experts' weights are read once and never copied.
        """
        n, k = ids.shape
        flat_ids = ids.reshape(-1)
        inputs = x.repeat_interleave(k, dim=0).float().unsqueeze(1)  # [N·k, 1, D]
        gate_up = (self.gate_up[flat_ids].float() * inputs).sum(-1).to(x.dtype)  # [N·k, 2I]
        gate, up = gate_up.split(self.intermediate, dim=-1)
        hidden = (F.silu(gate) * up).float().unsqueeze(1)  # [N·k, 1, I]
        return (self.down[flat_ids].float() * hidden).sum(-1).to(x.dtype).view(n, k, -1)

    def run_dense(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Same result as run_gathered, running every expert on every token: reads each weight once,
        with no host synchronisation — the choice for decode batches where N·k exceeds the expert count."""
        gate, up = torch.einsum("nd,eid->nei", x, self.gate_up).split(self.intermediate, dim=-1)
        out = torch.einsum("nei,edi->ned", F.silu(gate) * up, self.down)  # [N, E, D]
        return out.gather(1, ids.unsqueeze(-1).expand(-1, -1, out.shape[-1]))

    def run_grouped(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Same result as run_gathered, grouping tokens by expert (efficient for many tokens)."""
        n, k = ids.shape
        flat_ids = ids.reshape(-1)
        order = flat_ids.argsort(stable=True)
        counts = torch.bincount(flat_ids, minlength=self.gate_up.shape[0]).tolist()
        tokens = x[order // k]
        outputs = torch.empty_like(tokens)
        start = 0
        for expert, count in enumerate(counts):
            if count:
                rows = slice(start, start + count)
                gate, up = F.linear(tokens[rows], self.gate_up[expert]).split(self.intermediate, dim=-1)
                outputs[rows] = F.linear(F.silu(gate) * up, self.down[expert])
                start += count
        result = torch.empty_like(outputs)
        result[order] = outputs
        return result.view(n, k, -1)


class MoE(nn.Module):
    """Routed experts (weighted by the gate) plus always-on shared experts."""

    def __init__(self, config: LanguageConfig) -> None:
        super().__init__()
        self.gate = Gate(config)
        self.experts = StackedExperts(config.n_routed_experts, config.hidden_size, config.moe_intermediate_size)
        # Eager decode: loop over the chosen experts on the host (None: only on the CPU, where
        # reading the ids costs no device synchronisation).
        self.loop_on_host: Optional[bool] = None
        self.shared_experts = None
        if config.n_shared_experts:
            self.shared_experts = MLP(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts)

    def forward(self, x: torch.Tensor, routing: Optional[Routing] = None) -> torch.Tensor:
        """x [..., D] → same shape. ``routing`` records (or replays) this layer's expert choice."""
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        weights, ids = self.gate(flat) if routing is None else routing.choose(self.gate, flat)
        if x.dim() == 3 and x.shape[1] > 1:  # prefill: many tokens, group them by expert
            expert_out = self.experts.run_grouped(flat, ids)
        elif ids.numel() <= self.experts.gate_up.shape[0]:  # decode, few tokens: only their experts
            loop_on_host = flat.device.type == "cpu" if self.loop_on_host is None else self.loop_on_host
            if torch.compiler.is_compiling():
                expert_out = self.experts.run_indexed(flat, ids)
            elif loop_on_host:
                expert_out = self.experts.run_looped(flat, ids)
            else:
                expert_out = self.experts.run_gathered(flat, ids)
        else:  # decode, large batch: every expert once, no host sync
            expert_out = self.experts.run_dense(flat, ids)
        routed = (expert_out.to(torch.float32) * weights.unsqueeze(-1)).sum(dim=1).to(x.dtype)
        if self.shared_experts is not None:
            routed = routed + self.shared_experts(flat)
        return routed.view(shape)

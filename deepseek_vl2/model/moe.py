"""Feed-forward blocks of the DeepSeek-V2 decoder: SwiGLU MLP, the MoE gate, and the MoE layer.

Routed experts are stored stacked ([E, 2·I, D] gate+up and [E, D, I] down) and run by one of
three paths, all numerically equal (tools/parity/moe_reference.py holds slower references):

* prefill (many tokens per sequence): :meth:`StackedExperts.grouped`, tokens grouped by expert
  (one host sync per layer for the counts);
* decode, compiled or on a GPU: :meth:`StackedExperts.fused`, gather → multiply → float32 sum,
  which Inductor fuses into one reduction reading the chosen weights in place, with no host sync;
* decode, eager on the CPU: :meth:`StackedExperts.looped`, one matrix-vector product per chosen
  expert and token on its weights in place; the host is the device, so reading the ids costs
  nothing (3× to 10× faster than gathering, docs/engine.md).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .config import LanguageConfig
from .quantization import FORMATS, SCALE_SUFFIX, QuantizedLinear, check_format, project, quantize_rows


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


def reads_ids_on_host(x: torch.Tensor) -> bool:
    """Whether decode may read the chosen ids on the host: eager on the CPU, where the host is the
    device (no synchronisation). Compiled code and GPUs never do."""
    return x.device.type == "cpu" and not torch.compiler.is_compiling()


class StackedExperts(nn.Module):
    """All routed experts' SwiGLU weights in two stacked tensors: gate_up [E, 2I, D], down [E, D, I].

    With 8-bit weights (model/quantization.py) ``gate_up_scale`` [E, 2I] and ``down_scale`` [E, D]
    hold each output channel's float32 scale; without, they are None.
    """

    def __init__(self, n_experts: int, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.intermediate = intermediate
        self.gate_up = nn.Parameter(torch.empty(n_experts, 2 * intermediate, hidden))
        self.down = nn.Parameter(torch.empty(n_experts, hidden, intermediate))
        self.register_parameter("gate_up_scale", None)
        self.register_parameter("down_scale", None)

    def _swiglu(self, x: torch.Tensor, expert: int) -> torch.Tensor:
        """Expert ``expert`` on tokens x [n, D] → [n, D], its weights read in place."""
        gate_up_scale = None if self.gate_up_scale is None else self.gate_up_scale[expert]
        down_scale = None if self.down_scale is None else self.down_scale[expert]
        gate, up = project(x, self.gate_up[expert], gate_up_scale).split(self.intermediate, dim=-1)  # [n, I]
        return project(F.silu(gate) * up, self.down[expert], down_scale)

    def grouped(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Prefill: x [N, D], ids [N, k] → [N, k, D], tokens grouped by expert (one host sync)."""
        n, k = ids.shape
        order = ids.reshape(-1).argsort(stable=True)  # [N·k] (token, slot) pairs sorted by expert
        counts = torch.bincount(ids.reshape(-1), minlength=self.gate_up.shape[0]).tolist()
        tokens = x[order // k]  # [N·k, D]
        out = torch.empty_like(tokens)
        start = 0
        for expert, count in enumerate(counts):
            if count:
                out[start : start + count] = self._swiglu(tokens[start : start + count], expert)
                start += count
        return out.new_empty(out.shape).index_copy_(0, order, out).view(n, k, -1)

    def looped(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Eager CPU decode: x [N, D], ids [N, k] → [N, k, D], one expert on one token at a time.

        Every product has one row, so a token's result does not depend on the rest of the batch.
        """
        out = x.new_empty(*ids.shape, x.shape[-1])  # [N, k, D]
        for row, experts in enumerate(ids.tolist()):
            for slot, expert in enumerate(experts):
                out[row, slot] = self._swiglu(x[row : row + 1], expert)[0]
        return out

    def fused(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Compiled or GPU decode: x [N, D], ids [N, k] → [N, k, D] as gather → multiply → float32 sum.

        Under ``torch.compile`` Inductor turns each projection into one reduction kernel that loads
        ``gate_up[ids[r], i, :]`` / ``down[ids[r], o, :]`` straight from the stacked tensor: the
        chosen weights are read once, never copied, and the ids never leave the device; 8-bit
        weights are widened inside that reduction and scaled per output channel after it. (Run
        eagerly, the gather materialises the chosen weights in float32.)
        """
        n, k = ids.shape
        flat_ids = ids.reshape(-1)  # [N·k]
        inputs = x.repeat_interleave(k, dim=0).float().unsqueeze(1)  # [N·k, 1, D]
        gate_up = (self.gate_up[flat_ids].float() * inputs).sum(-1)  # [N·k, 2I] float32
        if self.gate_up_scale is not None:
            gate_up = gate_up * self.gate_up_scale[flat_ids]
        gate, up = gate_up.to(x.dtype).split(self.intermediate, dim=-1)
        hidden = (F.silu(gate) * up).float().unsqueeze(1)  # [N·k, 1, I]
        out = (self.down[flat_ids].float() * hidden).sum(-1)  # [N·k, D] float32
        if self.down_scale is not None:
            out = out * self.down_scale[flat_ids]
        return out.to(x.dtype).view(n, k, -1)  # [N, k, D]


class MoE(nn.Module):
    """Routed experts (weighted by the gate) plus always-on shared experts."""

    def __init__(self, config: LanguageConfig) -> None:
        super().__init__()
        self.gate = Gate(config)
        self.experts = StackedExperts(config.n_routed_experts, config.hidden_size, config.moe_intermediate_size)
        self.shared_experts = None
        if config.n_shared_experts:
            self.shared_experts = MLP(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts)

    def forward(self, x: torch.Tensor, routing: Optional[Routing] = None) -> torch.Tensor:
        """x [B, T, D] (or [N, D]) → same shape. ``routing`` records (or replays) this layer's choice."""
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # [N, D]
        weights, ids = self.gate(flat) if routing is None else routing.choose(self.gate, flat)  # [N, k] each
        if x.dim() == 3 and x.shape[1] > 1:
            expert_out = self.experts.grouped(flat, ids)  # prefill
        elif reads_ids_on_host(flat):
            expert_out = self.experts.looped(flat, ids)  # eager CPU decode
        else:
            expert_out = self.experts.fused(flat, ids)  # compiled or GPU decode
        routed = (expert_out.to(torch.float32) * weights.unsqueeze(-1)).sum(dim=1).to(x.dtype)  # [N, D]
        if self.shared_experts is not None:
            routed = routed + self.shared_experts(flat)
        return routed.view(shape)


@torch.no_grad()
def quantize_experts(model: nn.Module, fmt: str) -> nn.Module:
    """Store every MoE layer's routed and shared experts in 8 bits, in place; returns ``model``.

    Routed experts get 8-bit ``gate_up``/``down`` plus ``gate_up_scale`` [E, 2I] and
    ``down_scale`` [E, D]; the shared experts' three linears become :class:`QuantizedLinear`.
    On a model built on the meta device this only sets the shapes and dtypes (the loader then
    fills them with :func:`quantize_rows` as it reads the bf16 checkpoint); on a loaded model it
    quantizes one expert at a time, so the extra memory is one expert's float32 copy.
    """
    dtype = FORMATS[check_format(fmt)][0]
    for module in model.modules():
        if not isinstance(module, MoE):
            continue
        experts = module.experts
        for name in ("gate_up", "down"):
            weight = getattr(experts, name)  # [E, out, in]
            values = torch.empty(weight.shape, dtype=dtype, device=weight.device)
            scales = torch.empty(weight.shape[:2], device=weight.device)
            if weight.device.type != "meta":
                for e in range(weight.shape[0]):
                    values[e], scales[e] = quantize_rows(weight[e], fmt)
            setattr(experts, name, nn.Parameter(values, requires_grad=False))
            setattr(experts, name + SCALE_SUFFIX, nn.Parameter(scales, requires_grad=False))
        if module.shared_experts is not None:
            for name in ("gate_proj", "up_proj", "down_proj"):
                linear = getattr(module.shared_experts, name)
                with torch.device(linear.weight.device):
                    quantized = QuantizedLinear(linear.in_features, linear.out_features, fmt)
                if linear.weight.device.type != "meta":
                    quantized.weight.data, quantized.weight_scale.data = quantize_rows(linear.weight, fmt)
                setattr(module.shared_experts, name, quantized)
    return model

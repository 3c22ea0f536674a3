"""A MoE block: router, routed experts (Tucker or dense), optional shared expert.

One collective per block: the experts' pre-reduction partial (r_H values per token for
Tucker, H for dense) and the shared expert's row-parallel partial (H values) are
all-reduced together in one buffer.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn as nn

from tuckerize.arch import PROJECTIONS, Architecture
from tuckerize.runtime.parallel import ParallelContext, split_range
from tuckerize.runtime.routing import RouterSpec, expert_groups, route, sorted_pairs
from tuckerize.runtime.tucker_experts import ACTIVATIONS


class ParallelMLP(nn.Module):
    """gate/up column-parallel and down row-parallel over the intermediate size.
    ``partial`` returns this rank's share of the output (sum over ranks = output)."""

    def __init__(self, hidden: int, intermediate: int, parallel: ParallelContext, act: str = "silu", dtype=None, device=None):
        super().__init__()
        self.parallel = parallel
        self.range = split_range(intermediate, parallel.world, parallel.rank)
        n = self.range[1] - self.range[0]
        kw = {"dtype": dtype, "device": device, "bias": False}
        self.gate_proj = nn.Linear(hidden, n, **kw)
        self.up_proj = nn.Linear(hidden, n, **kw)
        self.down_proj = nn.Linear(n, hidden, **kw)
        self.act_fn = ACTIVATIONS[act]

    def partial(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.parallel.all_reduce(self.partial(x))


class DenseExperts(nn.Module):
    """Dense routed experts, tensor-parallel like vLLM's FusedMoE: gate/up split over I
    (column), down split over I (row); one all-reduce of H values per token.
    Weights in semantic axes: ``gate``/``up``/``down`` each [E, H, I_local]."""

    def __init__(self, num_experts: int, hidden: int, intermediate: int, parallel: ParallelContext,
                 act: str = "silu", dtype=None, device=None):
        super().__init__()
        self.parallel = parallel
        self.num_experts = num_experts
        self.inter_range = split_range(intermediate, parallel.world, parallel.rank)
        n = self.inter_range[1] - self.inter_range[0]
        for p in PROJECTIONS:
            self.register_buffer(p, torch.zeros(num_experts, hidden, n, dtype=dtype, device=device))
        self.act_fn = ACTIVATIONS[act]

    def load_stacked(self, stacked: Mapping[str, torch.Tensor]) -> None:
        """Full ``[E, H, I]`` tensors per projection (this rank takes its I slice)."""
        a, b = self.inter_range
        for p in PROJECTIONS:
            getattr(self, p).copy_(stacked[p][..., a:b])

    def partial(self, x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x)
        pair_e, pair_t, pair_w = sorted_pairs(top_k_index, top_k_weights)
        for e, a0, a1 in expert_groups(pair_e, self.num_experts):
            t = pair_t[a0:a1]
            h = x[t]
            a = self.act_fn(h @ self.gate[e]) * (h @ self.up[e])
            out.index_add_(0, t, (a @ self.down[e].T) * pair_w[a0:a1, None].to(x.dtype))
        return out

    def finish(self, s: torch.Tensor) -> torch.Tensor:
        return s

    def forward(self, x, top_k_index, top_k_weights):
        return self.finish(self.parallel.all_reduce(self.partial(x, top_k_index, top_k_weights)))


class Router(nn.Module):
    def __init__(self, spec: RouterSpec, hidden: int, dtype=None, device=None):
        super().__init__()
        self.spec = spec
        self.weight = nn.Parameter(torch.zeros(spec.num_experts, hidden, dtype=dtype, device=device), requires_grad=False)
        if spec.kind == "deepseek_v3":
            self.register_buffer("e_score_correction_bias", torch.zeros(spec.num_experts, dtype=torch.float32, device=device))
        else:
            self.e_score_correction_bias = None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return route(x, self.weight, self.spec, self.e_score_correction_bias)


class MoEBlock(nn.Module):
    """Router + routed experts + (optional) shared expert, with one all-reduce."""

    def __init__(self, arch: Architecture, config: Mapping[str, Any], router: RouterSpec, experts: nn.Module,
                 parallel: ParallelContext, dtype=None, device=None):
        super().__init__()
        hidden = int(config["hidden_size"])
        self.parallel = parallel
        self.gate = Router(router, hidden, dtype=dtype, device=device)
        self.experts = experts
        self.shared_name = None
        self.shared_gate = None
        act = config.get("hidden_act", "silu")
        if arch.shared_kind == "qwen" and int(config.get("shared_expert_intermediate_size") or 0) > 0:
            self.shared_name = "shared_expert"
            shared = ParallelMLP(hidden, int(config["shared_expert_intermediate_size"]), parallel, act, dtype, device)
            self.shared_expert_gate = nn.Linear(hidden, 1, bias=False, dtype=dtype, device=device)
            self.shared_gate = self.shared_expert_gate
        elif arch.shared_kind == "deepseek" and int(config.get("n_shared_experts") or 0) > 0:
            self.shared_name = "shared_experts"
            inter = int(config["moe_intermediate_size"]) * int(config["n_shared_experts"])
            shared = ParallelMLP(hidden, inter, parallel, act, dtype, device)
        if self.shared_name:
            setattr(self, self.shared_name, shared)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        top_w, top_i = self.gate(x)
        s = self.experts.partial(x, top_i, top_w)
        if self.shared_name is None:
            self.parallel.all_reduce(s)
            return self.experts.finish(s).to(hidden_states.dtype).reshape(shape)
        sh = getattr(self, self.shared_name).partial(x)
        if self.shared_gate is not None:
            sh = torch.sigmoid(self.shared_gate(x)) * sh
        buf = torch.cat([s, sh.to(s.dtype)], dim=-1)
        self.parallel.all_reduce(buf)
        s, sh = buf.split([s.shape[-1], sh.shape[-1]], dim=-1)
        return (self.experts.finish(s) + sh).to(hidden_states.dtype).reshape(shape)

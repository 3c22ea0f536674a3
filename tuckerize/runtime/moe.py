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
from tuckerize.parallel import ParallelContext, Split, activation, split_range
from tuckerize.runtime.routing import ROUTERS, RouterSpec, expert_groups, route, sorted_pairs


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
        self.act_fn = activation(act)
        self.full = intermediate

    def shard_spec(self, name: str) -> Split | None:
        """gate/up rows and down columns ``I_r`` of the full weights; None on one rank."""
        if self.range == (0, self.full):
            return None
        return Split(1 if name.startswith("down_proj") else 0, *self.range)

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
        self.intermediate = intermediate
        for p in PROJECTIONS:
            self.register_buffer(p, torch.zeros(num_experts, hidden, n, dtype=dtype, device=device))
        self.act_fn = activation(act)

    def shard_spec(self, name: str) -> Split | None:
        """Columns ``I_r`` (axis 2) of every stacked ``[E, H, I]`` projection; None on one rank."""
        if self.inter_range == (0, self.intermediate):
            return None
        return Split(2, *self.inter_range)

    def load_stacked(self, stacked: Mapping[str, torch.Tensor]) -> None:
        """Full ``[E, H, I]`` tensors per projection (this rank takes its I slice)."""
        from tuckerize.parallel import take

        for p in PROJECTIONS:
            getattr(self, p).copy_(take(stacked[p], self.shard_spec(p)))

    def cost_per_token(self, top_k: int) -> dict[str, float]:
        """Multiply-adds and values sent per token on this rank (see TuckerExperts.cost_per_token)."""
        N = self.parallel.world
        H = self.gate.shape[1]
        macs = top_k * sum(getattr(self, p)[0].numel() for p in PROJECTIONS)
        return {"macs": float(macs), "sent": 2.0 * H * (N - 1) / N, "payload": {"all_reduce": H}}

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
        if ROUTERS[spec.kind].bias:
            self.register_buffer("e_score_correction_bias", torch.zeros(spec.num_experts, dtype=torch.float32, device=device))
        else:
            self.e_score_correction_bias = None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return route(x, self.weight, self.spec, self.e_score_correction_bias)


def routed_experts(x: torch.Tensor, router_weight: torch.Tensor, spec: RouterSpec, experts: nn.Module,
                   bias: torch.Tensor | None = None) -> torch.Tensor:
    """[T, H] -> [T, H]: route (transformers' router semantics), then the experts' forward
    (their collectives included). What the vLLM plugin's MoE op runs per layer, and what
    bench/gpu.py captures in a CUDA graph without vLLM."""
    top_w, top_i = route(x, router_weight, spec, bias)
    return experts(x, top_i, top_w)


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
        self.shared_gate_name = None
        act = config.get("hidden_act", "silu")
        inter = 0
        if arch.shared_kind == "qwen":
            inter = int(config.get("shared_expert_intermediate_size") or 0)
        elif arch.shared_kind == "deepseek":
            inter = int(config.get("moe_intermediate_size") or 0) * int(config.get("n_shared_experts") or 0)
        if inter > 0:
            self.shared_name = arch.shared_expert
            setattr(self, self.shared_name, ParallelMLP(hidden, inter, parallel, act, dtype, device))
            if arch.shared_expert_gate:
                self.shared_gate_name = arch.shared_expert_gate
                setattr(self, arch.shared_expert_gate, nn.Linear(hidden, 1, bias=False, dtype=dtype, device=device))

    @property
    def shared_gate(self) -> nn.Module | None:
        """The shared expert's sigmoid gate (Qwen), registered under the architecture's name."""
        return getattr(self, self.shared_gate_name) if self.shared_gate_name else None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        top_w, top_i = self.gate(x)
        s = self.experts.partial(x, top_i, top_w)
        if self.shared_name is None:
            s = self.parallel.all_reduce(s)
            return self.experts.finish(s).to(hidden_states.dtype).reshape(shape)
        sh = getattr(self, self.shared_name).partial(x)
        if self.shared_gate is not None:
            sh = torch.sigmoid(self.shared_gate(x)) * sh
        buf = torch.cat([s, sh.to(s.dtype)], dim=-1)
        buf = self.parallel.all_reduce(buf)
        s, sh = buf.split([s.shape[-1], sh.shape[-1]], dim=-1)
        return (self.experts.finish(s) + sh).to(hidden_states.dtype).reshape(shape)

"""The static-shape decode path of the Tucker experts, in torch: the reference and the
fallback (CPU, NPU) of the Triton kernels, and capturable in a CUDA graph itself.

Axes (DESIGN.md): T tokens, K experts per token, P = T*K routed pairs (token-major:
pair p belongs to token p // K), E_loc experts on this rank, r_H / r_I ranks.

Every shape is a function of (T, K) and the factor shapes, never of the routing: no
``.tolist()``/``.item()``, no ``bincount``, no boolean-mask indexing, no sort-dependent
sizes. Each pair gathers its expert's core G[e] (r_H x r_I) and one batched product
applies it; the reduction over a token's K pairs is a reshape and a sum. For the
``expert`` layout, pairs routed to another rank's experts are kept with weight 0 (and
expert 0's core, a finite stand-in) instead of being filtered out.

The gather copies P cores per projection, so this path is for small P (decoding); the
sorted, grouped path of :class:`TuckerExperts` stays the prefill path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class DecodeFactors:
    """What the decode paths read from a :class:`TuckerExperts` module (one place to adapt
    if the module is restructured).

    U_H[p] [H, r_H,p], U_I[p] [I_loc, r_I,p], G[p] [E_loc, r_H,p, r_I,p] for p in
    gate, up, down; experts [e0, e1) of num_experts are this rank's."""

    U_H: dict[str, torch.Tensor]
    U_I: dict[str, torch.Tensor]
    G: dict[str, torch.Tensor]
    e0: int
    e1: int
    num_experts: int
    act: str
    act_fn: Callable[[torch.Tensor], torch.Tensor]

    @classmethod
    def of(cls, module) -> "DecodeFactors":
        projs = ("gate", "up", "down")
        return cls(
            U_H={p: getattr(module, p).U_H for p in projs},
            U_I={p: getattr(module, p).U_I for p in projs},
            G={p: getattr(module, p).G for p in projs},
            e0=module.expert_range[0], e1=module.expert_range[1], num_experts=module.num_experts,
            act=module.act_name, act_fn=module.act_fn,
        )

    @property
    def dtype(self) -> torch.dtype:
        return self.G["gate"].dtype

    @property
    def sliced(self) -> bool:
        """True when this rank holds only some experts (``expert`` layout, world > 1)."""
        return (self.e0, self.e1) != (0, self.num_experts)


def local_routing(f: DecodeFactors, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
    """Flat per-pair expert (local index) and weight [P], same shapes for every routing:
    pairs of other ranks' experts get expert 0 and weight 0."""
    e = top_k_index.reshape(-1)
    w = top_k_weights.reshape(-1)
    if f.sliced:
        local = (e >= f.e0) & (e < f.e1)
        e = torch.where(local, e - f.e0, torch.zeros_like(e))
        w = torch.where(local, w, torch.zeros_like(w))
    return e, w


def static_partial(f: DecodeFactors, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                   top_k_weights: torch.Tensor) -> torch.Tensor:
    """This rank's ``s = sum_e w_e (a_e U_I,d) G_d[e]^T`` [T, r_H,d], as
    :meth:`TuckerExperts.partial`, with static shapes and no host synchronisation.

    hidden_states [T, H], top_k_index [T, K] (global expert ids), top_k_weights [T, K]."""
    T, K = top_k_index.shape
    x = hidden_states.to(f.dtype)
    e, w = local_routing(f, top_k_index, top_k_weights)

    def per_pair(rows_by_token: torch.Tensor, p: str) -> torch.Tensor:
        # [T, r_H] -> each token's row repeated for its K pairs -> [P, 1, r_H] @ G[e] [P, r_H, r_I]
        rows = rows_by_token.unsqueeze(1).expand(T, K, rows_by_token.shape[1]).reshape(T * K, 1, -1)
        return torch.bmm(rows, f.G[p][e]).squeeze(1)

    zg = per_pair(x @ f.U_H["gate"], "gate")  # [P, r_I,g]
    zu = per_pair(x @ f.U_H["up"], "up")
    a = f.act_fn(zg @ f.U_I["gate"].T) * (zu @ f.U_I["up"].T)  # [P, I_loc]
    y = (a @ f.U_I["down"]).unsqueeze(1)  # [P, 1, r_I,d]
    zd = torch.bmm(y, f.G["down"][e].transpose(1, 2)).squeeze(1)  # [P, r_H,d]
    zd = zd * w.to(zd.dtype)[:, None]
    return zd.reshape(T, K, -1).sum(1)

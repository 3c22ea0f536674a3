"""The Tucker experts module: a MoE layer's expert mixture computed from its factors.

Axes (DESIGN.md): T tokens, K experts per token, P = T*K routed pairs, E experts,
H hidden, I intermediate, r_E/r_H/r_I Tucker ranks. For projection p,

    W_p[e] = U_H,p  G_p[e]  U_I,p^T        (H x I),   G_p[e] = sum_a U_E,p[e, a] core_p[a]

and for one token x routed to experts e with weights w_e

    g_e = ((x U_H,g) G_g[e]) U_I,g^T       x U_H,g once per token, shared by its experts
    u_e = ((x U_H,u) G_u[e]) U_I,u^T
    a_e = silu(g_e) * u_e
    out = (sum_e w_e (a_e U_I,d) G_d[e]^T) U_H,d^T      U_H,d^T once per token

Dense expert weights are never formed. The per-expert cores G_p[e] are formed once
when factors are loaded (:meth:`TuckerExperts.materialize`), never per token: forming
them per token (as the first draft did) costs r_E r_H r_I multiply-adds per pair,
more than the dense expert it replaces. Routed pairs are sorted by expert so that
each expert's core multiplies all of its tokens in one matrix product.

Tensor-parallel layouts (activations replicated on every rank):

``intermediate``
    rank r holds rows I_r of U_I for gate, up and down; U_E, U_H, the cores are
    replicated. Each rank computes its slice of g and u, a partial ``a U_I,d[I_r]``
    (a partial sum over I) and the partial ``s = sum_e w_e (.) G_d[e]^T`` of length
    r_H; ``s`` is all-reduced (r_H values per token) before ``U_H,d^T``.
``expert``
    rank r holds the cores of experts E_r (rows E_r of U_E), all other factors
    replicated; it computes only the pairs routed to E_r, then all-reduces ``s``.

Both give the single-device result: the all-reduce sums exactly the terms the single
device sums. Uneven splits (I or E not divisible by the world size) are exact.
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from tuckerize.arch import FACTORS, PROJECTIONS
from tuckerize.errors import ShardError
from tuckerize.runtime.parallel import ParallelContext, split_range

LAYOUTS = ("intermediate", "expert")

ACTIVATIONS = {"silu": F.silu, "swish": F.silu, "gelu": F.gelu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


class TuckerFactors(nn.Module):
    """The factors of one projection on this rank: U_E, U_H, U_I, core, and the
    per-expert cores G (formed from U_E and core, not saved)."""

    def __init__(self, shape: tuple[int, int, int], ranks: tuple[int, int, int], dtype=None, device=None):
        super().__init__()
        E, H, I = shape
        rE, rH, rI = ranks
        kw = {"dtype": dtype, "device": device}
        self.register_buffer("U_E", torch.zeros(E, rE, **kw))
        self.register_buffer("U_H", torch.zeros(H, rH, **kw))
        self.register_buffer("U_I", torch.zeros(I, rI, **kw))
        self.register_buffer("core", torch.zeros(rE, rH, rI, **kw))
        self.register_buffer("G", torch.zeros(E, rH, rI, **kw), persistent=False)

    def materialize(self) -> None:
        """G[e] = sum_a U_E[e, a] core[a], once per expert (float32 accumulation)."""
        g = torch.einsum("ea,abc->ebc", self.U_E.float(), self.core.float())
        self.G = g.to(self.core.dtype).contiguous()


class TuckerExperts(nn.Module):
    """Drop-in replacement for transformers' experts module (v5 interface):
    ``forward(hidden_states [T, H], top_k_index [T, K], top_k_weights [T, K]) -> [T, H]``.

    Parameters
    ----------
    num_experts, hidden_size, intermediate_size : E, H, I of the layer.
    ranks : ``{"gate": (r_E, r_H, r_I), "up": ..., "down": ...}``.
    layout : ``"intermediate"`` or ``"expert"`` (see the module docstring).
    parallel : rank/world/group; by default the initialised process group or one rank.
    """

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        ranks: Mapping[str, tuple[int, int, int]],
        *,
        layout: str = "intermediate",
        parallel: ParallelContext | None = None,
        act: str = "silu",
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        if layout not in LAYOUTS:
            raise ShardError(f"layout {layout!r} is not one of {', '.join(LAYOUTS)}")
        if act not in ACTIVATIONS:
            raise ShardError(f"activation {act!r} is not supported; supported: {', '.join(ACTIVATIONS)}")
        self.parallel = parallel or ParallelContext.current()
        self.layout = layout
        self.num_experts, self.hidden_size, self.intermediate_size = num_experts, hidden_size, intermediate_size
        self.ranks = {p: tuple(int(r) for r in ranks[p]) for p in PROJECTIONS}
        world, rank = self.parallel.world, self.parallel.rank
        # What this rank owns.
        if layout == "expert":
            self.expert_range = split_range(num_experts, world, rank)
            self.inter_range = (0, intermediate_size)
        else:
            self.expert_range = (0, num_experts)
            self.inter_range = split_range(intermediate_size, world, rank)
        e_local = self.expert_range[1] - self.expert_range[0]
        i_local = self.inter_range[1] - self.inter_range[0]
        self.act_fn = ACTIVATIONS[act]
        self.act_name = act
        #: At most this many routed pairs take the gather + batched-product path (decoding).
        self.gather_pairs = 16
        #: kernels hook: ``decode_impl(self, x, index, weights) -> s | None`` (tuckerize.runtime.kernels)
        self.decode_impl = None
        for p in PROJECTIONS:
            setattr(self, p, TuckerFactors((e_local, hidden_size, i_local), self.ranks[p], dtype, device))

    # -- loading -------------------------------------------------------------------------
    def local_slice(self, factor: str) -> tuple[int, int, int] | None:
        """``(axis, start, stop)`` of the full factor that this rank holds, or None if replicated."""
        if factor == "U_E" and self.layout == "expert":
            return (0, *self.expert_range)
        if factor == "U_I" and self.layout == "intermediate":
            return (0, *self.inter_range)
        return None

    def load_factors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Load ``{"gate.U_E": ..., ...}``: full (unsharded) factors are sliced here,
        already-sliced ones (from a shard set) are taken as they are; then the
        per-expert cores are formed."""
        for p in PROJECTIONS:
            mod: TuckerFactors = getattr(self, p)
            for f in FACTORS:
                key = f"{p}.{f}"
                if key not in tensors:
                    raise ShardError(f"factor {key} is missing; the Tucker checkpoint or shard is incomplete")
                src = tensors[key]
                dst = getattr(mod, f)
                sl = self.local_slice(f)
                if tuple(src.shape) != tuple(dst.shape) and sl is not None:
                    axis, start, stop = sl
                    full = self.num_experts if f == "U_E" else self.intermediate_size
                    if src.ndim == dst.ndim and src.shape[axis] == full:  # else: the shape error below
                        src = src.narrow(axis, start, stop - start)
                if tuple(src.shape) != tuple(dst.shape):
                    raise ShardError(
                        f"factor {key} has shape {list(src.shape)}, this rank expects {list(dst.shape)}; "
                        "was the shard written for another layout or tp size?"
                    )
                dst.copy_(src)
            mod.materialize()

    def materialize(self) -> None:
        for p in PROJECTIONS:
            getattr(self, p).materialize()

    # -- forward -------------------------------------------------------------------------
    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        s = self.partial(hidden_states, top_k_index, top_k_weights)
        self.parallel.all_reduce(s)  # r_H values per token: the one collective
        return self.finish(s).to(hidden_states.dtype)

    def partial(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        """This rank's share of ``s = sum_e w_e (a_e U_I,d) G_d[e]^T`` [T, r_H,d]; the
        sum over ranks of ``partial`` is the single-device ``s``."""
        if self.decode_impl is not None:  # kernels hook: static-shape / Triton decode path
            s = self.decode_impl(self, hidden_states, top_k_index, top_k_weights)
            if s is not None:
                return s
        T, K = top_k_index.shape
        gate, up, down = self.gate, self.up, self.down
        x = hidden_states.to(gate.U_H.dtype)

        # Routed pairs, restricted to this rank's experts, sorted by expert.
        flat_e = top_k_index.reshape(-1)
        flat_w = top_k_weights.reshape(-1)
        flat_t = torch.arange(T, device=x.device).repeat_interleave(K)
        e0, e1 = self.expert_range
        if (e0, e1) != (0, self.num_experts):
            keep = (flat_e >= e0) & (flat_e < e1)
            flat_e, flat_w, flat_t = flat_e[keep] - e0, flat_w[keep], flat_t[keep]
        if flat_e.numel() <= self.gather_pairs:
            # Few pairs (decoding): gather each pair's core and use one batched product;
            # no sort, no grouping, fewer kernels.
            pair_e, pair_t, pair_w = flat_e, flat_t, flat_w

            def by_expert(rows, cores, transpose):
                g = cores[pair_e]
                return torch.bmm(rows.unsqueeze(1), g.transpose(1, 2) if transpose else g).squeeze(1)
        else:
            order = torch.argsort(flat_e, stable=True)
            pair_e, pair_t, pair_w = flat_e[order], flat_t[order], flat_w[order]
            counts = torch.bincount(pair_e, minlength=e1 - e0)

            def by_expert(rows, cores, transpose):
                return _per_expert(rows, cores, counts, transpose)

        # Shared input projections: once per token, shared by its experts.
        xg = x @ gate.U_H
        xu = x @ up.U_H
        zg = by_expert(xg[pair_t], gate.G, False)
        zu = by_expert(xu[pair_t], up.G, False)
        a = self.act_fn(zg @ gate.U_I.T) * (zu @ up.U_I.T)  # [P, I_local]
        zd = by_expert(a @ down.U_I, down.G, True)  # [P, r_H,d]
        zd = zd * pair_w.to(zd.dtype)[:, None]
        s = torch.zeros(T, zd.shape[1], dtype=zd.dtype, device=x.device)
        s.index_add_(0, pair_t, zd)
        return s

    def finish(self, s: torch.Tensor) -> torch.Tensor:
        """``s U_H,d^T``, once per token, after the all-reduce."""
        return s @ self.down.U_H.T

    def extra_repr(self) -> str:
        return (f"E={self.num_experts}, H={self.hidden_size}, I={self.intermediate_size}, ranks={self.ranks}, "
                f"layout={self.layout}, rank={self.parallel.rank}/{self.parallel.world}, "
                f"experts={self.expert_range}, intermediate={self.inter_range}")


_GROUPED_OK: dict[tuple[str, torch.dtype], bool] = {}


def _grouped_mm(rows: torch.Tensor, weights: torch.Tensor, offs: torch.Tensor) -> torch.Tensor | None:
    """``torch.nn.functional.grouped_mm`` where this torch, device and dtype support it
    (one kernel, no host synchronisation); None where they do not."""
    fn = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
    key = (rows.device.type, rows.dtype)
    if fn is None or _GROUPED_OK.get(key) is False:
        return None
    try:
        out = fn(rows, weights, offs=offs)
    except (RuntimeError, NotImplementedError, TypeError):
        _GROUPED_OK[key] = False
        return None
    _GROUPED_OK[key] = True
    return out


def _per_expert(rows: torch.Tensor, cores: torch.Tensor, counts: torch.Tensor, transpose: bool) -> torch.Tensor:
    """``rows[pairs of e] @ cores[e]`` (or ``@ cores[e].T``) for rows sorted by expert;
    ``counts[e]`` rows belong to expert e."""
    weights = cores.transpose(1, 2) if transpose else cores
    if rows.shape[0] == 0:
        return rows.new_zeros(0, weights.shape[2])
    out = _grouped_mm(rows.contiguous(), weights, torch.cumsum(counts, 0).to(torch.int32))
    if out is not None:
        return out
    out = rows.new_empty(rows.shape[0], weights.shape[2])
    start = 0
    for e, n in enumerate(counts.tolist()):  # one host sync for the whole loop
        if n:
            torch.matmul(rows[start : start + n], weights[e], out=out[start : start + n])
            start += n
    return out

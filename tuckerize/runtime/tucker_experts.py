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
when factors are loaded (:meth:`TuckerFactors.materialize`), never per token: forming
them per token (as the first draft did) costs r_E r_H r_I multiply-adds per pair,
more than the dense expert it replaces. Routed pairs are sorted by expert so that
each expert's core multiplies all of its tokens in one matrix product.

The forward has static shapes and no host synchronisation in every layout and on every rank
(so ``torch.compile(fullgraph=True, dynamic=True)`` compiles it and a CUDA graph captures it):
each pair's expert is mapped to this rank's index of it by a table built at construction
(``expert_slot``; another rank's expert gets the index past this rank's, so its pairs sort last
and fall outside every group), counts and offsets stay on the device, and the kernel that
multiplies (:mod:`tuckerize.runtime.kernels`) is chosen once, when the factors are loaded.

Tensor-parallel layouts (activations replicated on every rank):

``intermediate``
    rank r holds rows I_r of U_I for gate, up and down; U_E, U_H, the cores are
    replicated. Each rank computes its slice of g and u, a partial ``a U_I,d[I_r]``
    (a partial sum over I) and the partial ``s = sum_e w_e (.) G_d[e]^T`` of length
    r_H; ``s`` is all-reduced (r_H values per token) before ``U_H,d^T``.
``expert``
    rank r holds the cores of experts E_r (rows E_r of U_E), all other factors
    replicated; it computes only the pairs routed to E_r, then all-reduces ``s``.
``hybrid``
    every term split by N. Rank r holds columns R_r of U_H,gate and U_H,up (r_H/N
    each), the experts E_r (rows of U_E), rows H_r of U_H,down; U_I and the small
    cores are replicated. It projects x onto its columns and one all-gather assembles
    x U_H,gate and x U_H,up (r_H,g + r_H,u values); it computes the pairs routed to E_r;
    ``s`` (r_H,d values) is all-reduced; it computes its H/N output columns
    ``s U_H,d[H_r]^T`` and one all-gather (H values) assembles the output.
``hybrid-replicated-out``
    as ``hybrid``, but U_H,down is replicated: after the all-reduce of ``s`` every rank
    computes the whole ``s U_H,d^T`` (H r_H,d multiply-adds per token, not divided) and
    no output all-gather is needed. It sends r_H,g + r_H,u + 2 r_H,d values per token
    (ring), no more than dense tensor parallelism's 2 H whenever r_H,g + r_H,u + 2 r_H,d
    <= 2 H, where ``hybrid`` needs <= H: the layout for larger ranks.

Each layer of the runtime owns how its weights are split (``shard_spec``, beside its
forward); the shard writer asks a model built on the meta device
(:func:`tuckerize.runtime.plan.rank_splits`), so loading and sharding cannot disagree.

E_r is contiguous by default, or the experts a shard set assigned to the rank by measured
load (``experts=``). Every layout gives the single-device result: the all-reduce sums
exactly the terms the single device sums. Uneven splits (I, E, H or r_H not divisible by
the world size) are exact.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.nn as nn

from tuckerize.arch import FACTORS, PROJECTIONS
from tuckerize.errors import ShardError
from tuckerize.runtime.kernels import ExpertFactors, KernelChoice, choose_kernel
from tuckerize.parallel import (EXPERT_SPLIT_LAYOUTS, INPUT_SPLIT_LAYOUTS, LAYOUTS, ParallelContext, Split, activation,
                                check_layout, split_range, split_sizes, take)


class TuckerFactors(nn.Module):
    """The factors of one projection on this rank: U_E [E_r, r_E], U_H [H_r, r_H,r],
    U_I [I_r, r_I], core [r_E, r_H, r_I], and the per-expert cores G [E_r, r_H, r_I]
    (formed from U_E and core, not saved). ``_r``: this rank's part (the whole on one rank)."""

    def __init__(self, u_e: tuple[int, int], u_h: tuple[int, int], u_i: tuple[int, int],
                 core: tuple[int, int, int], dtype=None, device=None):
        super().__init__()
        kw = {"dtype": dtype, "device": device}
        self.register_buffer("U_E", torch.zeros(*u_e, **kw))
        self.register_buffer("U_H", torch.zeros(*u_h, **kw))
        self.register_buffer("U_I", torch.zeros(*u_i, **kw))
        self.register_buffer("core", torch.zeros(*core, **kw))
        self.register_buffer("G", torch.zeros(u_e[0], core[1], core[2], **kw), persistent=False)

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
    layout : one of :data:`tuckerize.parallel.LAYOUTS` (see the module docstring).
    parallel : rank/world/group; by default one rank (rank 0 of 1). Pass
        ``ParallelContext.current()`` at a runtime entry point for tensor parallelism.
    experts : the experts this rank holds in ``expert`` and ``hybrid`` (the shard set's
        assignment by measured load); by default the contiguous split.
    kernel : ``auto`` (default: ``TUCKERIZE_KERNEL``, else by device and dtype), ``grouped``,
        ``triton`` or ``gather`` (:func:`tuckerize.runtime.kernels.choose_kernel`); chosen when
        the factors are loaded, recorded in :attr:`kernel`.
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
        experts: Sequence[int] | None = None,
        kernel: str | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        check_layout(layout)
        self.act_fn = activation(act)
        self.act_name = act
        self.parallel = parallel or ParallelContext()
        self.layout = layout
        self.num_experts, self.hidden_size, self.intermediate_size = num_experts, hidden_size, intermediate_size
        self.ranks = {p: tuple(int(r) for r in ranks[p]) for p in PROJECTIONS}
        world, rank = self.parallel.world, self.parallel.rank
        # What this rank owns: experts E_r (expert, hybrid), intermediate rows I_r
        # (intermediate); in hybrid also the r_H columns of U_H,gate/up and the H rows of U_H,down.
        split_experts = layout in EXPERT_SPLIT_LAYOUTS
        self.expert_range = split_range(num_experts, world, rank) if split_experts else (0, num_experts)
        #: Explicit expert ids of this rank (assignment by load), else None (the range above).
        self.expert_ids: tuple[int, ...] | None = None
        if experts is not None and split_experts and tuple(experts) != tuple(range(*self.expert_range)):
            self.expert_ids = tuple(int(e) for e in experts)
        local = list(self.expert_ids) if self.expert_ids is not None else list(range(*self.expert_range))
        #: global expert id -> this rank's index of it, len(local) for another rank's expert
        slot = torch.full((num_experts,), len(local), dtype=torch.long)
        slot[local] = torch.arange(len(local))
        self.register_buffer("expert_slot", slot.to(device) if device is not None else slot, persistent=False)
        self.layout_splits_experts = split_experts and len(local) < num_experts
        self.inter_range = split_range(intermediate_size, world, rank) if layout == "intermediate" else (0, intermediate_size)
        split_in, split_out = layout in INPUT_SPLIT_LAYOUTS, layout == "hybrid"
        self.rh_sizes = {p: split_sizes(self.ranks[p][1], world) if split_in else [self.ranks[p][1]] for p in ("gate", "up")}
        self.rh_range = {p: split_range(self.ranks[p][1], world, rank) if split_in else (0, self.ranks[p][1])
                         for p in ("gate", "up")}
        self.hidden_sizes = split_sizes(hidden_size, world) if split_out else [hidden_size]
        self.hidden_range = split_range(hidden_size, world, rank) if split_out else (0, hidden_size)
        e_local = self.expert_range[1] - self.expert_range[0] if self.expert_ids is None else len(self.expert_ids)
        i_local = self.inter_range[1] - self.inter_range[0]
        #: the kernel of the per-pair chain and the factors it reads, chosen and prepared at
        #: load (:meth:`materialize`) and again after a move to another device or dtype
        self.kernel: KernelChoice | None = None
        self._factors: ExpertFactors | None = None
        self._requested_kernel = kernel
        for p in PROJECTIONS:
            rE, rH, rI = self.ranks[p]
            if p == "down":
                u_h = (self.hidden_range[1] - self.hidden_range[0], rH)
            else:
                u_h = (hidden_size, self.rh_range[p][1] - self.rh_range[p][0])
            setattr(self, p, TuckerFactors((e_local, rE), u_h, (i_local, rI), (rE, rH, rI), dtype, device))

    # -- tensor parallelism: which slice of each full factor this rank holds -----------
    def shard_spec(self, name: str) -> Split | None:
        """The rows or columns of the full factor ``name`` (``"gate.U_E"``, ...) that this
        rank holds; None where it holds the whole factor (replicated)."""
        p, f = name.split(".")
        full = {"U_E": self.num_experts, "U_I": self.intermediate_size, "U_H": self.hidden_size}
        if f == "U_E" and self.expert_ids is not None:
            return Split(0, 0, len(self.expert_ids), index=self.expert_ids)
        if f == "U_E":
            axis, rng = 0, self.expert_range
        elif f == "U_I":
            axis, rng = 0, self.inter_range
        elif f == "U_H" and p == "down":
            axis, rng = 0, self.hidden_range
        elif f == "U_H":
            axis, rng = 1, self.rh_range[p]
            full["U_H"] = self.ranks[p][1]
        else:
            return None
        if rng == (0, full[f]):
            return None
        return Split(axis, *rng)

    def load_factors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Load ``{"gate.U_E": ..., ...}``: full (unsharded) factors are sliced here
        (:meth:`shard_spec`), already-sliced ones (from a shard set) are taken as they
        are; then the per-expert cores are formed."""
        for p in PROJECTIONS:
            for f in FACTORS:
                key = f"{p}.{f}"
                if key not in tensors:
                    raise ShardError(f"factor {key} is missing; the Tucker checkpoint or shard is incomplete")
                self.load_factor(key, tensors[key])
        self.materialize()

    def load_factor(self, key: str, src: torch.Tensor) -> None:
        """One factor, full or this rank's slice (cores are formed by :meth:`materialize`)."""
        p, f = key.split(".")
        dst = getattr(getattr(self, p), f)
        sp = self.shard_spec(key)
        if tuple(src.shape) != tuple(dst.shape) and sp is not None and src.ndim == dst.ndim:
            if src.shape[sp.axis] == self._full_size(key, sp.axis):  # a full factor; else the error below
                src = take(src, sp)
        if tuple(src.shape) != tuple(dst.shape):
            raise ShardError(
                f"factor {key} has shape {list(src.shape)}, this rank expects {list(dst.shape)}; "
                "was the shard written for another layout or tp size?"
            )
        with torch.no_grad():
            dst.copy_(src)

    def _full_size(self, key: str, axis: int) -> int:
        p, f = key.split(".")
        if f == "U_H":
            return self.hidden_size if axis == 0 else self.ranks[p][1]
        return self.num_experts if f == "U_E" else self.intermediate_size

    def materialize(self) -> None:
        """Form the per-expert cores of every projection (after loading), choose the kernel
        for the factors' device and dtype and prepare what it reads (once, not per call)."""
        for p in PROJECTIONS:
            getattr(self, p).materialize()
        self._prepare()

    def _prepare(self) -> None:
        G = self.gate.G
        self.kernel = choose_kernel(G.device, G.dtype, self.act_name, self._requested_kernel)
        self._factors = self.kernel.prepare(self)

    def _apply(self, fn, recurse=True):
        """After ``.to()``/``.cuda()``/``.half()``: the kernel and its prepared factors follow."""
        super()._apply(fn, recurse)
        if self._factors is not None:
            self._prepare()
        return self

    # -- forward -------------------------------------------------------------------------
    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        s = self.partial(hidden_states, top_k_index, top_k_weights)
        s = self.parallel.all_reduce(s)  # r_H values per token
        return self.finish(s).to(hidden_states.dtype)

    def _projected_input(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x U_H,gate`` and ``x U_H,up`` [T, r_H] (as wide as the kernel's factors: padded
        columns are zero): once per token, shared by its experts. In the hybrid layouts each
        rank projects onto its r_H/N columns and one all-gather (r_H,gate + r_H,up values per
        token) assembles the whole."""
        f = self._factors
        if not f.split_input:
            return f.project_in(x)
        xg, xu = x @ self.gate.U_H, x @ self.up.U_H
        sizes = [a + b for a, b in zip(self.rh_sizes["gate"], self.rh_sizes["up"])]
        both = self.parallel.all_gather_cat(torch.cat([xg, xu], dim=-1), sizes, dim=-1)
        pieces = both.split([n for pair in zip(self.rh_sizes["gate"], self.rh_sizes["up"]) for n in pair], dim=-1)
        return (f.pad_input(torch.cat(pieces[0::2], dim=-1), "gate"),
                f.pad_input(torch.cat(pieces[1::2], dim=-1), "up"))

    def partial(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        """This rank's share of ``s = sum_e w_e (a_e U_I,d) G_d[e]^T`` [T, r_H,d]; the
        sum over ranks of ``partial`` is the single-device ``s``. Static shapes, no host
        synchronisation (:mod:`tuckerize.runtime.kernels`)."""
        if self._factors is None:
            raise ShardError("the Tucker experts have no factors yet: load them (load_factors) before the forward")
        T, K = top_k_index.shape
        f = self._factors
        x = hidden_states.to(f.dtype)
        xg, xu = self._projected_input(x)  # before any early return: hybrid's all-gather is collective
        if T == 0 or f.n_experts == 0:
            return x.new_zeros(T, f.rank_hd)
        expert = self.expert_slot[top_k_index.reshape(-1)]  # this rank's index, n_experts: another rank's
        return self.kernel.partial(f, xg, xu, expert, top_k_weights.reshape(-1), K)

    def finish(self, s: torch.Tensor) -> torch.Tensor:
        """``s U_H,d^T``, once per token, after the all-reduce of ``s``. In ``hybrid`` each
        rank computes its H/N output columns and one all-gather (H values) assembles them."""
        out = s @ self.down.U_H.T if self._factors is None else self._factors.product("out", s)
        if self.layout == "hybrid":
            out = self.parallel.all_gather_cat(out, self.hidden_sizes, dim=-1)
        return out

    # -- cost, from this rank's own shapes --------------------------------------------
    def cost_per_token(self, top_k: int) -> dict[str, float]:
        """Multiply-adds and values sent per token on this rank, with ``top_k`` experts per
        token spread evenly (a pair lands on this rank with probability E_r / E).

        ``macs``: the products of :meth:`partial` and :meth:`finish`; ``sent``: values this
        rank sends in its collectives (ring all-reduce of n values: 2 n (N-1)/N; ring
        all-gather of n values in all: n (N-1)/N); ``payload``: the collectives' sizes.
        With a kernel whose products do not stop at this rank's pair count (``gather``:
        :attr:`KernelChoice.bounded`), every pair is computed, other ranks' with weight 0.
        Once loaded, the shapes are those the kernel multiplies (ranks zero-padded to 16
        bytes where a grouped kernel needs it; real ranks usually need none)."""
        N = self.parallel.world
        f = self._factors
        G = {p: f.G[p] if f else getattr(self, p).G for p in PROJECTIONS}
        U_I = {p: f.U_I[p] if f else getattr(self, p).U_I for p in PROJECTIONS}
        split_in = self.layout in INPUT_SPLIT_LAYOUTS and N > 1
        U_H = {p: f.U_H[p] if f and not split_in else getattr(self, p).U_H for p in ("gate", "up")}
        bounded = self.kernel is None or self.kernel.bounded
        pairs = top_k * self.gate.U_E.shape[0] / self.num_experts if bounded else float(top_k)
        per_pair = sum(G[p][0].numel() + U_I[p].numel() for p in PROJECTIONS)  # cores, U_I products
        macs = U_H["gate"].numel() + U_H["up"].numel() + pairs * per_pair + self.down.U_H.numel()
        reduce_s = self.down.G.shape[1]
        payload = {"all_reduce": reduce_s}
        sent = 2 * reduce_s * (N - 1) / N
        if self.layout in INPUT_SPLIT_LAYOUTS and N > 1:
            gathered = self.ranks["gate"][1] + self.ranks["up"][1]
            if self.layout == "hybrid":  # and the output columns
                gathered += self.hidden_size
            payload.update(all_gather=gathered)
            sent += gathered * (N - 1) / N
        return {"macs": float(macs), "sent": float(sent), "payload": payload}

    def memory_bytes(self) -> dict[str, int]:
        """Bytes this rank holds for the layer: ``factors`` (U_E, U_H, U_I, core of the three
        projections, as loaded: quantised factors are dequantised at load), ``cores``
        (the per-expert cores G formed from them) and ``kernel`` (the kernel's own copies:
        zero-padded factors where a grouped kernel needs 16-byte ranks, usually none; on the
        CPU the ``U_H`` weights packed for oneDNN)."""
        def nbytes(t: torch.Tensor) -> int:
            return t.numel() * t.element_size()

        factors = sum(nbytes(getattr(getattr(self, p), f)) for p in PROJECTIONS for f in FACTORS)
        cores = sum(nbytes(getattr(self, p).G) for p in PROJECTIONS)
        kernel = self._factors.extra_bytes(self) if self._factors is not None else 0
        return {"factors": factors, "cores": cores, "kernel": kernel, "total": factors + cores + kernel}

    def extra_repr(self) -> str:
        return (f"E={self.num_experts}, H={self.hidden_size}, I={self.intermediate_size}, ranks={self.ranks}, "
                f"layout={self.layout}, rank={self.parallel.rank}/{self.parallel.world}, "
                f"experts={self.expert_range}, intermediate={self.inter_range}, "
                f"kernel={self.kernel.name if self.kernel else None}")


def memory_per_layer(experts: Sequence[TuckerExperts]) -> dict[str, float] | None:
    """Mean over MoE layers of :meth:`TuckerExperts.memory_bytes` on this rank, with the
    bytes this rank's share of the dense experts would take in the same dtype
    (``dense_same_dtype``: 3 E H I / N values); None without Tucker experts."""
    experts = [m for m in experts if isinstance(m, TuckerExperts)]
    if not experts:
        return None
    mems = [m.memory_bytes() for m in experts]
    n = len(mems)
    out: dict[str, float] = {k: sum(m[k] for m in mems) / n for k in ("factors", "cores", "kernel", "total")}
    dense = [3 * m.num_experts * m.hidden_size * m.intermediate_size * m.gate.core.element_size() / m.parallel.world
             for m in experts]
    out.update(layers=n, dense_same_dtype=sum(dense) / n)
    return out

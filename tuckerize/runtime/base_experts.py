"""Routed experts stored as a packed quantised base, a shared Tucker residual, or both.

Per projection p of a MoE layer (semantic axes, DESIGN.md), each expert's weight is

    W_p[e] = B_p[e] + U_H,p G_p[e] U_I,p^T        (H x I)

with either term optional: the base ``B_p[e]`` on a 2..8-bit grid with float16 scale and zero
per group along its input axis, kept packed (:mod:`tuckerize.quant_packed`; gate/up stored
``[E, I, H]``, down ``[E, H, I]``: out x in, as a dense quantised checkpoint), and the residual
a Tucker model whose ``U_H``, ``U_I`` are shared by the layer's experts
(:class:`tuckerize.runtime.tucker_experts.TuckerFactors`; per-expert cores formed at load).

Forward of the pairs routed to expert e (tokens ``x [n, H]``): the base of e is dequantised
into a buffer of ``I x H`` values once per call (only the experts a batch touches; the
packed codes stay as they are), and

    g = x B_g[e] + ((x U_H,g) G_g[e]) U_I,g^T       (x U_H,g once per token)
    u = x B_u[e] + ((x U_H,u) G_u[e]) U_I,u^T
    a = act(g) * u
    out += w (a B_d[e]^T),     s += w (a U_I,d) G_d[e]^T,     out += s U_H,d^T  (once per token)

Dense expert weights of the whole layer are never formed.

Tensor parallelism (activations replicated, one all-reduce of H values per token, as dense TP):

``intermediate``
    rank r holds the intermediate range I_r: rows I_r of gate/up's base (its output axis),
    columns I_r of down's base (its input axis, cut on whole groups and bytes: I_r is a whole
    number of down's groups, so ranks may hold unequal shares), rows I_r of every U_I; U_E,
    U_H and the cores replicated. Every rank sums its part of ``out``.
``expert``
    rank r holds the experts E_r (the base's first axis, rows of U_E), everything else
    replicated; it computes the pairs routed to E_r.

The hybrid layouts split U_H and are refused for these forms.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
import torch.nn as nn

from tuckerize.arch import FACTORS, PROJECTIONS
from tuckerize.errors import ShardError
from tuckerize.format import base_name, factor_name
from tuckerize.parallel import EXPERT_SPLIT_LAYOUTS, ParallelContext, Split, activation, split_range
from tuckerize.quant_packed import dequantize_rows
from tuckerize.runtime.routing import expert_groups, sorted_pairs
from tuckerize.runtime.tucker_experts import TuckerFactors

#: Layouts these experts run in.
BASE_LAYOUTS = ("intermediate", "expert")
BASE_PARTS = ("codes", "scale", "zero")


class PackedBase(nn.Module):
    """One projection's base on this rank: ``codes`` uint8 ``[E_r, out_r, ceil(in_r b / 8)]``,
    ``scale``/``zero`` float16 ``[E_r, out_r, ceil(in_r / g)]``, for ``bits`` b and group g."""

    def __init__(self, experts: int, out: int, inp: int, bits: int, group: int, device=None):
        super().__init__()
        self.bits, self.group, self.inp = int(bits), int(min(group, inp) if inp else group), int(inp)
        n = math.ceil(inp / self.group) if inp else 0
        self.register_buffer("codes", torch.zeros(experts, out, math.ceil(inp * bits / 8), dtype=torch.uint8,
                                                  device=device))
        self.register_buffer("scale", torch.zeros(experts, out, n, dtype=torch.float16, device=device))
        self.register_buffer("zero", torch.zeros(experts, out, n, dtype=torch.float16, device=device))

    def weight(self, e: int, dtype) -> torch.Tensor:
        """Expert ``e``'s ``[out_r, in_r]`` in ``dtype``, dequantised now."""
        return dequantize_rows(self.codes[e], self.scale[e], self.zero[e], self.bits, self.group, self.inp, dtype)


def projection_forms(entry: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """``{p: {"ranks": (r_E, r_H, r_I) | None, "base": {"bits", "group"} | None}}`` of one layer's
    config entry (``config["tucker"]["layers"][L]``)."""
    out = {}
    for p in PROJECTIONS:
        e = entry[p]
        out[p] = {"ranks": tuple(int(r) for r in e["ranks"]) if e.get("ranks") else None,
                  "base": dict(e["base"]) if e.get("base") else None}
    return out


def has_base(entry: Mapping[str, Any]) -> bool:
    """Whether a layer's config entry stores any projection with a quantised base."""
    return any(entry[p].get("base") for p in PROJECTIONS)


class BaseResidualExperts(nn.Module):
    """Drop-in experts module (``forward(hidden_states, top_k_index, top_k_weights)``,
    ``partial``/``finish`` as :class:`tuckerize.runtime.moe.MoEBlock` calls them) for
    layers whose projections have a quantised base and/or a Tucker residual.

    ``forms``: :func:`projection_forms` of the layer; ``layout``: one of :data:`BASE_LAYOUTS`."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int,
                 forms: Mapping[str, Mapping[str, Any]], *, layout: str = "intermediate",
                 parallel: ParallelContext | None = None, act: str = "silu", experts: Sequence[int] | None = None,
                 dtype: torch.dtype | None = None, device=None):
        super().__init__()
        if layout not in BASE_LAYOUTS:
            raise ShardError(f"layout {layout} splits U_H and is not available for experts stored as a quantised "
                             f"base; use one of {', '.join(BASE_LAYOUTS)}")
        self.forms = {p: dict(forms[p]) for p in PROJECTIONS}
        for p, f in self.forms.items():
            if f.get("ranks") is None and f.get("base") is None:
                raise ShardError(f"projection {p} has neither a base nor Tucker ranks in the checkpoint's config")
        self.parallel = parallel or ParallelContext()
        self.layout, self.act_fn, self.act_name = layout, activation(act), act
        self.num_experts, self.hidden_size, self.intermediate_size = num_experts, hidden_size, intermediate_size
        world, rank = self.parallel.world, self.parallel.rank
        self.expert_range = split_range(num_experts, world, rank) if layout in EXPERT_SPLIT_LAYOUTS else (0, num_experts)
        self.expert_ids: tuple[int, ...] | None = None
        if experts is not None and layout in EXPERT_SPLIT_LAYOUTS and tuple(experts) != tuple(range(*self.expert_range)):
            self.expert_ids = tuple(int(e) for e in experts)
            lut = torch.full((num_experts,), -1, dtype=torch.long, device=device)
            lut[list(self.expert_ids)] = torch.arange(len(self.expert_ids), device=device)
            self.register_buffer("local_index", lut, persistent=False)
        self.inter_range = self._inter_range() if layout == "intermediate" else (0, intermediate_size)
        e_local = self.expert_range[1] - self.expert_range[0] if self.expert_ids is None else len(self.expert_ids)
        i_local = self.inter_range[1] - self.inter_range[0]
        for p in PROJECTIONS:
            part = nn.Module()
            base, ranks = self.forms[p].get("base"), self.forms[p].get("ranks")
            if base is not None:
                out, inp = (hidden_size, i_local) if p == "down" else (i_local, hidden_size)
                part.base = PackedBase(e_local, out, inp, base["bits"], base["group"], device)
            if ranks is not None:
                rE, rH, rI = ranks
                part.tucker = TuckerFactors((e_local, rE), (hidden_size, rH), (i_local, rI), (rE, rH, rI), dtype, device)
            setattr(self, p, part)

    def _inter_range(self) -> tuple[int, int]:
        """This rank's intermediate range: whole groups (and bytes) of down's base input axis."""
        I, world, rank = self.intermediate_size, self.parallel.world, self.parallel.rank
        base = self.forms["down"].get("base")
        if base is None or world == 1:
            return split_range(I, world, rank)
        # whole groups starting on whole bytes: a multiple of the group and of 8 / gcd(8, bits)
        unit = math.lcm(min(int(base["group"]), I), 8 // math.gcd(8, int(base["bits"])))
        units = math.ceil(I / unit)
        a, b = split_range(units, world, rank)
        return min(I, a * unit), min(I, b * unit)

    # -- which slice of each full stored tensor this rank holds --------------------------
    def shard_spec(self, name: str) -> Split | None:
        """``"gate.base"`` (the logical base ``[E, out, in]``), ``"gate.tucker.U_I"``, ...:
        the rows or columns of the full tensor this rank holds; None: replicated."""
        p, kind, *rest = name.split(".")
        if kind == "base":
            if self.layout == "expert":
                return self._expert_split(0)
            if self.inter_range == (0, self.intermediate_size):
                return None
            return Split(2 if p == "down" else 1, *self.inter_range)
        f = rest[0]
        if f == "U_E":
            return self._expert_split(0)
        if f == "U_I" and self.inter_range != (0, self.intermediate_size):
            return Split(0, *self.inter_range)
        return None

    def _expert_split(self, axis: int) -> Split | None:
        if self.expert_ids is not None:
            return Split(axis, 0, len(self.expert_ids), index=self.expert_ids)
        if self.expert_range == (0, self.num_experts):
            return None
        return Split(axis, *self.expert_range)

    def stored_names(self, prefix: str) -> dict[str, str]:
        """``{attribute: tensor name}`` of everything this module loads (``prefix``: the
        architecture's experts prefix of the layer); the base under its logical name."""
        out = {}
        for p in PROJECTIONS:
            if self.forms[p].get("base") is not None:
                out[f"{p}.base"] = base_name(prefix, p)
            if self.forms[p].get("ranks") is not None:
                out.update({f"{p}.tucker.{f}": factor_name(prefix, p, f) for f in FACTORS})
        return out

    def load_base(self, p: str, stored: Mapping[str, torch.Tensor], name: str) -> None:
        """This rank's part of ``p``'s base from its stored tensors (``name.qcodes`` ...), as
        sliced for this rank (a shard file's, or by :meth:`shard_spec`)."""
        base = getattr(self, p).base
        shape = [int(v) for v in stored[f"{name}.qshape"].tolist()]
        bits, group = shape[-1], shape[-2]
        for part, suffix in zip(BASE_PARTS, (".qcodes", ".qscale", ".qzero")):
            src, dst = stored[f"{name}{suffix}"], getattr(base, part)
            if tuple(src.shape) != tuple(dst.shape) or bits != base.bits or group != base.group:
                raise ShardError(f"{name}{suffix} has shape {list(src.shape)} ({bits} bits, groups of {group}); this "
                                 f"rank expects {list(dst.shape)} ({base.bits} bits, groups of {base.group}): was the "
                                 "shard written for another layout or tp size?")
            with torch.no_grad():
                dst.copy_(src)

    def load_tensors(self, stored: Mapping[str, torch.Tensor], prefix: str, sliced: bool = False) -> None:
        """Load every tensor of :meth:`stored_names` from ``stored`` (stored names: a base's
        ``.qcodes/.qscale/.qzero/.qshape``, factors plain or quantised): full tensors are
        sliced here by :meth:`shard_spec` (the base without unpacking: a split that cuts a
        group is an error), ``sliced`` ones (a shard file's) taken as they are; then the
        residual's per-expert cores are formed."""
        from tuckerize.parallel import take
        from tuckerize.quant import decode
        from tuckerize.quant_packed import SUFFIXES, slice_stored

        for attr, name in self.stored_names(prefix).items():
            sp = None if sliced else self.shard_spec(attr)
            if attr.endswith(".base"):
                part = {f"{name}{s}": stored[f"{name}{s}"] for s in SUFFIXES}
                if sp is not None:
                    rows = torch.tensor(sp.index, dtype=torch.long) if sp.index is not None else None
                    got = slice_stored(part, name, sp.axis, rows=rows, start=sp.start, stop=sp.stop)
                    if got is None:
                        raise ShardError(f"{name}: this rank's slice [{sp.start}, {sp.stop}) of axis {sp.axis} cuts a "
                                         "group of the packed base; use another tp size or layout")
                    part = got
                self.load_base(attr.split(".")[0], part, name)
                continue
            p, _, f = attr.split(".")
            dst = getattr(getattr(self, p).tucker, f)
            src = take(decode(stored, name), sp)
            if tuple(src.shape) != tuple(dst.shape):
                raise ShardError(f"{name} has shape {list(src.shape)}, this rank expects {list(dst.shape)}; "
                                 "was the shard written for another layout or tp size?")
            with torch.no_grad():
                dst.copy_(src)
        self.materialize()

    def materialize(self) -> None:
        for p in PROJECTIONS:
            part = getattr(self, p)
            if hasattr(part, "tucker"):
                part.tucker.materialize()

    # -- forward ------------------------------------------------------------------------------
    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        s = self.parallel.all_reduce(self.partial(hidden_states, top_k_index, top_k_weights))
        return self.finish(s).to(hidden_states.dtype)

    def _local_pairs(self, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        pair_e, pair_t, pair_w = sorted_pairs(top_k_index, top_k_weights)
        if self.expert_ids is not None:
            local = self.local_index[pair_e]
            keep = local >= 0
            pair_e, pair_t, pair_w = local[keep], pair_t[keep], pair_w[keep]
            order = torch.argsort(pair_e, stable=True)
            return pair_e[order], pair_t[order], pair_w[order], len(self.expert_ids)
        e0, e1 = self.expert_range
        if (e0, e1) != (0, self.num_experts):
            keep = (pair_e >= e0) & (pair_e < e1)
            pair_e, pair_t, pair_w = pair_e[keep] - e0, pair_t[keep], pair_w[keep]
        return pair_e, pair_t, pair_w, e1 - e0

    def _projection(self, p: str, e: int, h: torch.Tensor, zh: torch.Tensor | None) -> torch.Tensor:
        """gate/up of expert e for its tokens ``h [n, H]`` (``zh``: ``h U_H,p``)."""
        part = getattr(self, p)
        y = None
        if hasattr(part, "base"):
            y = h @ part.base.weight(e, h.dtype).T
        if hasattr(part, "tucker"):
            t = (zh @ part.tucker.G[e]) @ part.tucker.U_I.T
            y = t if y is None else y + t
        return y

    def partial(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        """This rank's share of the experts' output ``[T, H]`` (summed over ranks: the output)."""
        dtype = self.compute_dtype
        x = hidden_states.to(dtype)
        out = torch.zeros(x.shape[0], self.hidden_size, dtype=dtype, device=x.device)
        pair_e, pair_t, pair_w, n_local = self._local_pairs(top_k_index, top_k_weights)
        proj = {p: x @ getattr(self, p).tucker.U_H if hasattr(getattr(self, p), "tucker") else None
                for p in ("gate", "up")}
        down = self.down
        s = None
        if hasattr(down, "tucker"):
            s = torch.zeros(x.shape[0], down.tucker.U_H.shape[1], dtype=dtype, device=x.device)
        for e, a0, a1 in expert_groups(pair_e, n_local):
            t, w = pair_t[a0:a1], pair_w[a0:a1].to(dtype)[:, None]
            h = x[t]
            g = self._projection("gate", e, h, proj["gate"][t] if proj["gate"] is not None else None)
            u = self._projection("up", e, h, proj["up"][t] if proj["up"] is not None else None)
            a = self.act_fn(g) * u
            if hasattr(down, "base"):
                out.index_add_(0, t, (a @ down.base.weight(e, dtype).T) * w)
            if s is not None:
                s.index_add_(0, t, ((a @ down.tucker.U_I) @ down.tucker.G[e].T) * w)
        if s is not None:
            out += s @ down.tucker.U_H.T
        return out

    def finish(self, s: torch.Tensor) -> torch.Tensor:
        return s

    @property
    def compute_dtype(self) -> torch.dtype:
        for p in PROJECTIONS:
            part = getattr(self, p)
            if hasattr(part, "tucker"):
                return part.tucker.U_H.dtype
        return torch.get_default_dtype()

    # -- cost ---------------------------------------------------------------------------------
    def cost_per_token(self, top_k: int) -> dict[str, float]:
        """Multiply-adds and values sent per token on this rank (top_k pairs spread evenly)."""
        N = self.parallel.world
        e_local = (self.expert_range[1] - self.expert_range[0]) if self.expert_ids is None else len(self.expert_ids)
        pairs = top_k * e_local / self.num_experts
        H, I_r = self.hidden_size, self.inter_range[1] - self.inter_range[0]
        shared, per_pair = 0, 0
        for p in PROJECTIONS:
            part = getattr(self, p)
            if hasattr(part, "base"):
                per_pair += H * I_r
            if hasattr(part, "tucker"):
                _, rH, rI = self.forms[p]["ranks"]
                shared += H * rH
                per_pair += rH * rI + I_r * rI
        return {"macs": float(shared + pairs * per_pair), "sent": 2.0 * H * (N - 1) / N, "payload": {"all_reduce": H}}

    def memory_bytes(self) -> dict[str, int]:
        """Bytes this rank holds: the packed bases, the residual factors and their cores."""
        def nbytes(t: torch.Tensor) -> int:
            return t.numel() * t.element_size()

        base = factors = cores = 0
        for p in PROJECTIONS:
            part = getattr(self, p)
            if hasattr(part, "base"):
                base += sum(nbytes(getattr(part.base, k)) for k in BASE_PARTS)
            if hasattr(part, "tucker"):
                factors += sum(nbytes(getattr(part.tucker, f)) for f in FACTORS)
                cores += nbytes(part.tucker.G)
        return {"base": base, "factors": factors, "cores": cores, "total": base + factors + cores}

    def extra_repr(self) -> str:
        return (f"E={self.num_experts}, H={self.hidden_size}, I={self.intermediate_size}, forms={self.forms}, "
                f"layout={self.layout}, rank={self.parallel.rank}/{self.parallel.world}, "
                f"experts={self.expert_range}, intermediate={self.inter_range}")


__all__ = ["BaseResidualExperts", "PackedBase", "projection_forms", "has_base", "BASE_LAYOUTS"]

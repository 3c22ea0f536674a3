"""The Tucker experts' per-pair chain in torch, with static shapes and no host synchronisation.

Axes (DESIGN.md): T tokens, K experts per token, P = T*K routed pairs (token-major: pair p
belongs to token p // K), E_loc experts on this rank, r_H / r_I ranks (``p`` suffix: padded,
see :class:`ExpertFactors`). Inputs of every kernel here: the projected input ``xg``,
``xu`` [T, r_Hp] (``x U_H`` of gate and up, once per token), ``expert`` [P] (this rank's
index of each pair's expert, E_loc for a pair of another rank's expert) and ``weight`` [P].
Output: this rank's ``s = sum_e w_e (a_e U_I,d) G_d[e]^T`` [T, r_H,d].

Every shape is a function of T, K and the factor shapes, never of the routing: no
``.item()``/``.tolist()``, no ``bincount``, no boolean-mask indexing, no Python branch on a
routed value. So each path compiles under ``torch.compile(fullgraph=True, dynamic=True)``
and, on CUDA, can be captured in a CUDA graph where its products can (:mod:`tuckerize.
runtime.kernels` records which).

* :func:`grouped_partial` (``grouped``): pairs sorted by expert (one stable argsort; other
  ranks' pairs sort last), per-expert counts by scatter-add and their cumulative offsets on
  the device, one grouped matrix product per core (:func:`grouped_op`: torch's grouped_mm on
  CUDA, one product per expert with rows on the CPU). In the expert-split
  layouts the ``U_I`` products are grouped products of one group that stops at this rank's
  pair count (a device-side offset), so a rank multiplies only its own pairs; the rows past
  that count are left unwritten by ``grouped_mm`` and are selected away (``where``), never
  multiplied by a zero weight (garbage times zero can be NaN).
* :func:`gather_partial` (``gather``): each pair gathers its expert's core and one batched
  product applies it; no sort. For devices without a grouped product: it copies P cores per
  projection (memory-bound; chunked so a chunk's copies stay under :data:`GATHER_BYTES`),
  and computes the pairs of other ranks' experts with weight zero (a finite stand-in core).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch
import torch.nn.functional as F

from tuckerize.parallel import INPUT_SPLIT_LAYOUTS

#: most bytes of gathered cores per projection per chunk on the ``gather`` path
GATHER_BYTES = 256 << 20


def torch_grouped_mm() -> Callable | None:
    """This torch's ``grouped_mm`` (``torch.nn.functional.grouped_mm``, torch >= 2.9, or
    ``torch._grouped_mm``, 2.8), or None."""
    return getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


_LIB = None


def _grouped_loop(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """The CPU implementation: one matrix product per expert that has rows (the offsets are
    read from host memory: on the CPU that is no synchronisation), none for the others.
    torch's own CPU grouped_mm runs a product for every group, empty or not: with 128 experts
    and a few routed pairs (decoding) those 384 products per layer, each its own OpenMP
    region, cost more than the arithmetic."""
    out = a.new_empty(a.shape[0], b.shape[-1])
    start = 0
    for g, end in enumerate(offs.tolist()):
        if end > start:
            torch.mm(a[start:end], b[g], out=out[start:end])
        start = end
    return out


def _register_grouped_op() -> None:
    """``torch.ops.tuckerize.grouped_mm(a, b, offs)``: a grouped product with a fake
    (shape-only) implementation for every dtype, opaque to ``torch.compile`` (torch's own meta
    function accepts only bfloat16 inputs). On the CPU :func:`_grouped_loop`; elsewhere
    torch's grouped_mm (outside bfloat16 on sm90/sm100 torch's CUDA fallback reads the
    offsets on the host: not capturable, and :mod:`tuckerize.runtime.kernels` says so)."""
    global _LIB
    if _LIB is not None:
        return
    lib = torch.library.Library("tuckerize", "FRAGMENT")
    lib.define("grouped_mm(Tensor a, Tensor b, Tensor offs) -> Tensor")
    fn = torch_grouped_mm()

    def impl(a, b, offs):
        if a.device.type == "cpu" or fn is None:
            return _grouped_loop(a, b, offs)
        return fn(a, b, offs=offs)

    def fake(a, b, offs):
        return a.new_empty(a.shape[0], b.shape[-1])

    lib.impl("grouped_mm", impl, "CompositeExplicitAutograd")
    torch.library.register_fake("tuckerize::grouped_mm", fake, lib=lib)
    _LIB = lib


def grouped_op(dtype: torch.dtype, device_type: str = "cpu") -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor],
                                                                          torch.Tensor]:
    """``mm(a [P, k], b [G, k, n], offs [G] int32) -> [P, n]``: rows ``offs[g-1]:offs[g]``
    times ``b[g]``; rows past ``offs[-1]`` unwritten. torch's grouped_mm on CUDA in bfloat16
    (its CUTLASS kernels read the offsets on the device; torch.compile traces it), ours
    (above) otherwise."""
    fn = torch_grouped_mm()
    if device_type == "cuda" and dtype == torch.bfloat16 and fn is not None:
        return lambda a, b, offs: fn(a, b, offs=offs)
    _register_grouped_op()
    return torch.ops.tuckerize.grouped_mm


def alignment(dtype: torch.dtype) -> int:
    """Elements per 16 bytes: torch's grouped products need every row stride to be a multiple."""
    return max(1, 16 // torch.empty((), dtype=dtype).element_size())


def _pad(t: torch.Tensor, dims: tuple[int, ...], align: int) -> torch.Tensor:
    """``t`` with each of ``dims`` zero-padded to a multiple of ``align`` (``t`` itself,
    not a copy, when no padding is needed)."""
    size = list(t.shape)
    for d in dims:
        size[d] = -(-size[d] // align) * align
    if size == list(t.shape):
        return t
    out = t.new_zeros(size)
    out[tuple(slice(0, n) for n in t.shape)] = t
    return out


@dataclass(frozen=True)
class ExpertFactors:
    """What the kernels read from a Tucker experts module, prepared once at load.

    ``U_H`` gate/up [H, r_Hp] (the input projection; this rank's columns in hybrid) and down
    [H_r, r_H,d], ``U_I`` [I_locp, r_Ip], ``G`` [E_loc, r_Hp, r_Ip] per projection: zero-padded so
    that r_H, r_I and I_loc of gate and up are multiples of ``align`` elements (16 bytes: what
    grouped products need; the zeros change no sum). They are the module's own tensors, not
    copies, when the ranks are already multiples (real ranks such as 512/256 are). ``rank_hd``:
    r_H of down unpadded (the width of ``s``). ``split``: this rank holds some experts only
    (pairs of others get the index ``n_experts``); ``experts_total``: E of the layer;
    ``split_input``: ``x U_H`` is projected onto this rank's columns and gathered (hybrid).
    ``linear``: weights [N, K] of the dense products that a kernel runs through oneDNN
    (:mod:`~tuckerize.runtime.kernels.cpu_moe`), by name (:meth:`product`); empty: plain
    matrix products. ``linear_bytes``: the bytes of the copies among them (packed weights)."""

    U_H: dict[str, torch.Tensor]
    U_I: dict[str, torch.Tensor]
    G: dict[str, torch.Tensor]
    n_experts: int
    rank_hd: int
    split: bool
    act: str
    act_fn: Callable[[torch.Tensor], torch.Tensor]
    experts_total: int = 0
    split_input: bool = False
    linear: Mapping[str, torch.Tensor] = field(default_factory=dict)
    linear_bytes: int = 0

    @classmethod
    def prepare(cls, module, align: int = 1) -> "ExpertFactors":
        """From a :class:`~tuckerize.runtime.tucker_experts.TuckerExperts` whose cores are formed."""
        U_H, U_I, G = {"down": module.down.U_H}, {}, {}
        for p in ("gate", "up", "down"):
            f = getattr(module, p)
            G[p] = _pad(f.G, (1, 2), align)
            U_I[p] = _pad(f.U_I, (0, 1), align)  # I too: the rows of the U_I products' outputs
            if p != "down":
                U_H[p] = _pad(f.U_H, (1,), align)
        split_input = module.layout in INPUT_SPLIT_LAYOUTS and module.parallel.world > 1
        return cls(U_H=U_H, U_I=U_I, G=G, n_experts=int(module.gate.G.shape[0]), rank_hd=int(module.down.G.shape[1]),
                   split=module.layout_splits_experts, act=module.act_name, act_fn=module.act_fn,
                   experts_total=int(module.num_experts), split_input=split_input)

    @property
    def dtype(self) -> torch.dtype:
        return self.G["gate"].dtype

    def product(self, name: str, x: torch.Tensor, rows: torch.Tensor | None = None,
                mm: Callable | None = None) -> torch.Tensor:
        """The dense product ``name`` of ``x`` [M, K]: ``gate``/``up``: ``x U_I,p^T``; ``down``:
        ``x U_I,d``; ``out``: ``x U_H,d^T``. With ``rows`` (a one-element tensor, on the
        device) only the first ``rows[0]`` rows are computed: the others are zero through
        oneDNN, unwritten through the grouped product ``mm`` (:func:`grouped_op`)."""
        w = self.linear.get(name)
        if w is not None:
            return torch.ops.tuckerize.linear(x, w, rows)
        if name == "out":
            b = self.U_H["down"].T
        else:
            b = self.U_I["down"] if name == "down" else self.U_I[name].T
        return x @ b if rows is None else mm(x, b.unsqueeze(0), rows)

    def project_in(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x U_H,gate`` and ``x U_H,up`` [T, r_Hp] (one product where ``linear`` has both)."""
        w = self.linear.get("in")
        if w is None:
            return x @ self.U_H["gate"], x @ self.U_H["up"]
        both = torch.ops.tuckerize.linear(x, w, None)
        return both.split([self.U_H["gate"].shape[1], self.U_H["up"].shape[1]], dim=1)

    def pad_input(self, t: torch.Tensor, p: str) -> torch.Tensor:
        """[T, r_H,p] -> [T, r_Hp] (zero columns), for an input projected and gathered elsewhere."""
        n = self.G[p].shape[1]
        return t if t.shape[1] == n else torch.cat([t, t.new_zeros(t.shape[0], n - t.shape[1])], dim=1)

    def extra_bytes(self, module) -> int:
        """Bytes of the kernel's own copies: padded factors (0 when the ranks need no padding)
        and packed weights of the dense products (``linear_bytes``)."""
        total = self.linear_bytes
        for p in ("gate", "up", "down"):
            f = getattr(module, p)
            pairs = [(self.G[p], f.G), (self.U_I[p], f.U_I)] + ([(self.U_H[p], f.U_H)] if p != "down" else [])
            total += sum(a.numel() * a.element_size() for a, b in pairs if a is not b)
        return total


def _finish_s(f: ExpertFactors, s: torch.Tensor) -> torch.Tensor:
    return s if s.shape[1] == f.rank_hd else s[:, : f.rank_hd].contiguous()


def grouped_partial(f: ExpertFactors, mm: Callable, xg: torch.Tensor, xu: torch.Tensor, expert: torch.Tensor,
                    weight: torch.Tensor, top_k: int) -> torch.Tensor:
    """``s`` [T, r_H,d] through grouped products ``mm`` (:func:`grouped_op`); see the module docstring."""
    P = expert.numel()
    E = f.n_experts
    order = torch.argsort(expert, stable=True)  # by expert; other ranks' pairs (index E) last
    counts = torch.zeros(E + 1, dtype=torch.int32, device=expert.device)
    counts.index_add_(0, expert, torch.ones(P, dtype=torch.int32, device=expert.device))
    offs = torch.cumsum(counts[:E], 0, dtype=torch.int32)  # end of each expert's rows
    tok = order // top_k
    zg = mm(xg[tok], f.G["gate"], offs)  # [P, r_Ip,g]
    zu = mm(xu[tok], f.G["up"], offs)
    if f.split:  # rows past this rank's pair count: computed by no product below, selected away
        n = offs[-1:]
        a = f.act_fn(f.product("gate", zg, n, mm)) * f.product("up", zu, n, mm)
        zd = mm(f.product("down", a, n, mm), f.G["down"].transpose(1, 2), offs)
        valid = torch.arange(P, device=expert.device, dtype=torch.int32).unsqueeze(1) < n
        zd = torch.where(valid, zd, torch.zeros((), dtype=zd.dtype, device=zd.device))
    else:  # every pair is this rank's: offs[-1] == P, every row is written
        a = f.act_fn(f.product("gate", zg)) * f.product("up", zu)  # [P, I_loc]
        zd = mm(f.product("down", a), f.G["down"].transpose(1, 2), offs)  # [P, r_Hp,d]
    zd = zd * weight[order].to(zd.dtype).unsqueeze(1)
    s = torch.zeros(xg.shape[0], zd.shape[1], dtype=zd.dtype, device=zd.device)
    s.index_add_(0, tok, zd)
    return _finish_s(f, s)


def gather_partial(f: ExpertFactors, xg: torch.Tensor, xu: torch.Tensor, expert: torch.Tensor,
                   weight: torch.Tensor, top_k: int) -> torch.Tensor:
    """``s`` [T, r_H,d] with one gathered core per pair; see the module docstring."""
    T = xg.shape[0]
    E = f.n_experts
    local = expert < E
    e = expert.clamp(max=E - 1)  # another rank's pair: a real (finite) core, weight 0 below
    w = torch.where(local, weight, torch.zeros((), dtype=weight.dtype, device=weight.device))
    per_token = top_k * max(g[0].numel() for g in f.G.values()) * f.G["gate"].element_size()
    tokens = max(1, GATHER_BYTES // per_token)
    if T <= tokens:  # decoding and short prefills: one chunk (a guard on the size, not on values)
        return _finish_s(f, _gather_tokens(f, xg, xu, e, w, top_k))
    parts = [_gather_tokens(f, xg[t0: t0 + tokens], xu[t0: t0 + tokens], e[t0 * top_k: (t0 + tokens) * top_k],
                            w[t0 * top_k: (t0 + tokens) * top_k], top_k) for t0 in range(0, T, tokens)]
    return _finish_s(f, torch.cat(parts))


def _gather_tokens(f: ExpertFactors, xg, xu, e, w, top_k: int) -> torch.Tensor:
    """``s`` of the tokens of ``xg``/``xu`` (their pairs' experts ``e`` and weights ``w``)."""
    def rows(x):  # each token's row repeated for its K pairs: [P, 1, r_H]
        return x.unsqueeze(1).expand(-1, top_k, -1).reshape(-1, 1, x.shape[1])

    zg = torch.bmm(rows(xg), f.G["gate"][e]).squeeze(1)
    zu = torch.bmm(rows(xu), f.G["up"][e]).squeeze(1)
    a = f.act_fn(zg @ f.U_I["gate"].T) * (zu @ f.U_I["up"].T)
    zd = torch.bmm((a @ f.U_I["down"]).unsqueeze(1), f.G["down"][e].transpose(1, 2)).squeeze(1)
    zd = zd * w.to(zd.dtype).unsqueeze(1)
    return zd.reshape(xg.shape[0], top_k, -1).sum(1)

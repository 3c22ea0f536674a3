"""The CPU kernel of the Tucker experts (``bags``): few, large operations per call.

Axes as in :mod:`~tuckerize.runtime.kernels.torch_moe` (T tokens, K experts per token, P = T*K
pairs, E_loc experts on this rank, r_H / r_I ranks). On the CPU every torch operation large
enough to be parallel is one OpenMP region over the threads vLLM binds to cores; a region
waits for its slowest thread, so a call made of hundreds of small products (one per expert
with rows, per projection: the ``grouped`` kernel while decoding) pays hundreds of fork/joins,
and when another process holds one of those cores, hundreds of waits for a descheduled thread.
This kernel makes a decoding call a dozen operations whatever the routing:

* each pair's core product ``z_p = x_p G[e_p]`` is a weighted sum of the rows of ``G[e_p]``
  (``sum_k x_p[k] G[e_p][k, :]``): torch's ``embedding_bag`` over the cores viewed as one table
  of E_loc r_H rows, one bag of r_H rows per pair, the input as the per-row weights. One call
  (one parallel region) multiplies every pair of a projection, reading each core once per pair
  straight from the cores (no gathered copy, no per-expert product). Pairs are sorted by
  expert first, so the pairs of one expert are consecutive bags and its core is read from
  memory once and from cache after. ``down`` reads ``G_d[e]^T``: its cores are laid out
  transposed at load (the same values; :func:`prepare`). The routing weights enter as
  per-row weights of the down bags; one ``index_add`` sums the pairs of each token.
* the shared dense products (``x U_H`` of gate and up as one product, the ``U_I`` products,
  ``s U_H,d^T``) go through oneDNN (``torch.ops.mkldnn._linear_pointwise``: AVX-512 where the
  CPU has it, 2-3x MKL's float32 speed at decoding sizes on the bench machine), with the
  ``U_H`` weights reordered once at load into oneDNN's blocked layout (``weights packed``:
  they are copies, counted by :meth:`ExpertFactors.extra_bytes`). Where oneDNN lacks the
  dtype (float16 without AVX-512-FP16, float64) they are plain matrix products.
* in the expert-split layouts the pairs of other ranks' experts sort last and get empty bags
  (offsets past this rank's pair count all point at its end), and the ``U_I`` products stop at
  that count (:func:`linear` with ``rows``): a rank multiplies only its own pairs.

Above :data:`BAG_ROWS` pairs per expert on average (prefill), one matrix product per expert
reuses each core over its rows better than bags do: there the call runs the grouped products
(:func:`~tuckerize.runtime.kernels.torch_moe.grouped_partial`) with the same dense products.
Which path runs is decided by the shapes (T, K, E), never by the routing: static shapes, no
host synchronisation (``torch.compile(fullgraph=True, dynamic=True)`` compiles either).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from tuckerize.runtime.kernels.torch_moe import ExpertFactors, grouped_partial

#: most pairs per expert (P / E, on average) for which the bags run; above, grouped products
BAG_ROWS = 8

_LIB = None


def _linear_impl(x: torch.Tensor, weight: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """``x @ weight^T`` through oneDNN; with ``rows`` only the first ``rows[0]`` rows are
    computed (read from host memory: on the CPU no synchronisation) and the rest are zero."""
    def mm(a):
        return torch.ops.mkldnn._linear_pointwise(a, weight, None, "none", [], "")

    if rows is None:
        return mm(x)
    n = int(rows.reshape(-1)[0])
    if n >= x.shape[0]:
        return mm(x)
    return F.pad(mm(x[:n]), (0, 0, 0, x.shape[0] - n))


def register_linear_op() -> None:
    """``torch.ops.tuckerize.linear(x, weight, rows)``: :func:`_linear_impl` as one opaque op
    with a fake (shape-only) implementation. Opaque because inductor lowers oneDNN's linear
    only for weights that are constants of a frozen graph; ``weight`` is [N, K] (plain, or
    reordered by :func:`pack`, whose shape is still [N, K])."""
    global _LIB
    if _LIB is not None:
        return
    lib = torch.library.Library("tuckerize", "FRAGMENT")
    lib.define("linear(Tensor x, Tensor weight, Tensor? rows) -> Tensor")

    def fake(x, weight, rows):
        return x.new_empty(x.shape[0], weight.shape[0])

    lib.impl("linear", _linear_impl, "CompositeExplicitAutograd")
    torch.library.register_fake("tuckerize::linear", fake, lib=lib)
    _LIB = lib


def onednn_dtype(dtype: torch.dtype) -> bool:
    """Whether oneDNN multiplies ``dtype`` on this CPU (float32; bfloat16 where supported)."""
    if not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.float32:
        return True
    return dtype == torch.bfloat16 and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def pack(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` [N, K] reordered into oneDNN's blocked layout for ``x @ weight^T``: about
    twice as fast as the plain layout at decoding sizes for K in the thousands."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous())


def prepare(module) -> ExpertFactors:
    """The factors the ``bags`` kernel reads, from a loaded
    :class:`~tuckerize.runtime.tucker_experts.TuckerExperts` (once per load or move):
    the down cores laid out transposed (``module.down.G`` keeps its values; its storage
    becomes ``G_d^T`` contiguous, so no second copy exists), and the dense products through
    oneDNN where it has the dtype, ``U_H`` packed."""
    G = module.down.G
    if not G.transpose(1, 2).is_contiguous():
        module.down.G = G.transpose(1, 2).contiguous().transpose(1, 2)
    f = ExpertFactors.prepare(module, align=1)
    if module.gate.G.device.type != "cpu" or not onednn_dtype(f.dtype):
        return f
    register_linear_op()
    weights = {"gate": f.U_I["gate"], "up": f.U_I["up"], "down": f.U_I["down"].T, "out": pack(f.U_H["down"])}
    copies = weights["out"].numel()
    if not f.split_input:  # x U_H of gate and up as one product (hybrid: each rank's columns, gathered)
        weights["in"] = pack(torch.cat([f.U_H["gate"].T, f.U_H["up"].T]))
        copies += weights["in"].numel()
    return dataclasses.replace(f, linear=weights, linear_bytes=copies * f.G["gate"].element_size())


def _bags(table: torch.Tensor, expert: torch.Tensor, x: torch.Tensor, local: torch.Tensor | None) -> torch.Tensor:
    """``out[p] = sum_k x[p, k] table[expert[p] * r + k]`` [P, width] for ``x`` [P, r]: one bag of
    ``r`` rows per pair; with ``local`` (this rank's pair count, [1]) the bags from there on are
    empty (zero)."""
    P, r = x.shape
    rows = torch.arange(r, dtype=torch.int32, device=x.device)
    idx = torch.add(rows, expert.unsqueeze(1), alpha=r).reshape(-1)
    starts = torch.arange(P + 1, dtype=torch.int32, device=x.device)
    if local is not None:
        starts = torch.minimum(starts, local)
    return F.embedding_bag(idx, table, starts * r, mode="sum", per_sample_weights=x.reshape(-1),
                           include_last_offset=True)


def bag_partial(f: ExpertFactors, mm, xg: torch.Tensor, xu: torch.Tensor, expert: torch.Tensor,
                weight: torch.Tensor, top_k: int) -> torch.Tensor:
    """``s`` [T, r_H,d]; see the module docstring. ``mm``: the grouped product
    (:func:`~tuckerize.runtime.kernels.torch_moe.grouped_op`) of the prefill path and of the
    ``U_I`` products that stop at a rank's pair count without oneDNN."""
    P = expert.numel()
    E = f.n_experts
    if P > BAG_ROWS * f.experts_total:  # prefill: one product per expert (a guard on the size, not on values)
        return grouped_partial(f, mm, xg, xu, expert, weight, top_k)
    order = torch.argsort(expert, stable=True)  # by expert; other ranks' pairs (index E) last
    tok = order // top_k
    e = expert[order].clamp(max=E - 1).to(torch.int32)  # other ranks': a valid row, in an empty bag
    local = (expert < E).sum(dtype=torch.int32).reshape(1) if f.split else None
    Gg, Gu, Gd = f.G["gate"], f.G["up"], f.G["down"].transpose(1, 2)  # Gd: [E, r_I,d, r_H,d], contiguous
    zg = _bags(Gg.reshape(-1, Gg.shape[2]), e, xg[tok], local)  # [P, r_I,g]
    zu = _bags(Gu.reshape(-1, Gu.shape[2]), e, xu[tok], local)
    a = f.act_fn(f.product("gate", zg, local, mm)) * f.product("up", zu, local, mm)  # [P, I_loc]
    y = f.product("down", a, local, mm) * weight[order].to(a.dtype).unsqueeze(1)  # [P, r_I,d], weighted
    zd = _bags(Gd.reshape(-1, Gd.shape[2]), e, y, local)  # [P, r_H,d]; other ranks' pairs: 0
    s = torch.zeros(xg.shape[0], zd.shape[1], dtype=zd.dtype, device=zd.device)
    return s.index_add_(0, tok, zd)

"""Triton kernels for the Tucker experts' per-pair chain (GPU; the Triton interpreter in tests).

Axes: T tokens, K experts per token, P = T*K pairs (pair p is token p // K), E_loc
experts on this rank, BM pairs per block. Three kernels after the two shared input
projections ``x U_H,g`` and ``x U_H,u`` (torch matmuls, once per token):

1. ``_core_kernel`` (twice: gate, up): z[p] = xU_H[p // K] @ G[e_p]: the gather of the
   routed rows and the per-expert core in one kernel, a block of BM pairs of one expert
   per program, so each core is read once per block.
2. ``_act_kernel``: y[p] = (act(z_g[p] U_I,g^T) * (z_u[p] U_I,u^T)) U_I,d, the U_I
   projections, the activation, the gating and the down U_I projection fused; the
   [P, I] activations never reach memory (each program takes BI columns of I and adds
   its share of y with an atomic add).
3. ``_core_kernel`` (down, transposed core, weighted scatter): s[p // K] += w_p y[p] G_d[e_p]^T,
   the routing weights and the reduction over a token's pairs (atomic add into s).

Blocks of pairs come from :func:`pair_blocks` (held with the launch settings by
:class:`PairBlocks`, whose ``matmul`` launches ``_core_kernel``), computed with static
shapes (no host synchronisation, capturable in a CUDA graph): one pair per block for
decoding when every pair is this rank's (no sort at all), or pairs sorted by expert and
padded to whole blocks (fused-MoE style) for larger P and whenever this rank holds some
experts only. Blocks whose expert is -1 (padding, or another rank's experts) exit at once.
Sorted, the rows of ``z`` and ``y`` are compact (row i: the i-th of this rank's pairs in
expert order, ``slots``) and ``_act_kernel`` stops at this rank's pair count, read on the
device: a rank of the expert-split layouts multiplies only its own pairs by ``U_I``.

Under ``TRITON_INTERPRET=1`` bfloat16 operands of ``tl.dot`` are not supported by the
interpreter, so the dot operands are cast to float32 there (``PairBlocks.dot``); on a
GPU they stay in the factors' dtype with float32 accumulation. Block sizes are fixed
(BM 16/64, BN = BK = 64, BI 16/64), not autotuned: no GPU has timed them yet.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from tuckerize.errors import BackendError
from tuckerize.runtime.kernels.torch_moe import ExpertFactors

#: activation name -> the kernel's ACT constant
ACT_IDS = {"silu": 0, "swish": 0, "gelu": 1, "gelu_pytorch_tanh": 2}

_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@triton.jit
def _core_kernel(a_ptr, b_ptr, out_ptr, rows_ptr, slots_ptr, block_expert_ptr, w_ptr,
                 N, KD, TOPK,
                 stride_a, stride_be, stride_bk, stride_bn, stride_out,
                 BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                 SCATTER: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr):
    """out[.] = sum_k a[row, k] b[e, k, n] for the BM pairs p of block pid_m (expert e),
    pair p at compact row slot(p).
    SCATTER=False: a row p // TOPK, out row slot(p) (stored).
    SCATTER=True: a row slot(p), out row p // TOPK += w[p] * (.) (atomic)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(block_expert_ptr + pid_m)
    if e >= 0:
        offs_m = pid_m * BM + tl.arange(0, BM)
        pair = tl.load(rows_ptr + offs_m)
        valid = pair >= 0
        pair = tl.where(valid, pair, 0)
        slot = tl.where(valid, tl.load(slots_ptr + offs_m), 0)
        if SCATTER:
            a_row = slot
        else:
            a_row = pair // TOPK
        offs_n = pid_n * BN + tl.arange(0, BN)
        nmask = offs_n < N
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, KD, BK):
            offs_k = k0 + tl.arange(0, BK)
            kmask = offs_k < KD
            a = tl.load(a_ptr + a_row[:, None] * stride_a + offs_k[None, :],
                        mask=valid[:, None] & kmask[None, :], other=0.0)
            b = tl.load(b_ptr + e * stride_be + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn,
                        mask=kmask[:, None] & nmask[None, :], other=0.0)
            acc += tl.dot(a.to(DOT), b.to(DOT), input_precision=PREC)
        omask = valid[:, None] & nmask[None, :]
        if SCATTER:
            w = tl.load(w_ptr + pair, mask=valid, other=0.0).to(tl.float32)
            tok = pair // TOPK
            tl.atomic_add(out_ptr + tok[:, None] * stride_out + offs_n[None, :], acc * w[:, None], mask=omask)
        else:
            tl.store(out_ptr + slot[:, None] * stride_out + offs_n[None, :],
                     acc.to(out_ptr.dtype.element_ty), mask=omask)


@triton.jit
def _act_kernel(zg_ptr, zu_ptr, ug_ptr, uu_ptr, ud_ptr, y_ptr, nvalid_ptr,
                I, RG, RU, RD,
                BM: tl.constexpr, BI: tl.constexpr, RGP: tl.constexpr, RUP: tl.constexpr, RDP: tl.constexpr,
                ACT: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr):
    """y[p] += (act(z_g[p] U_g[i]^T) * (z_u[p] U_u[i]^T)) U_d[i] over the BI rows i of
    U_I that program pid_i owns, for the rows p < nvalid (read on the device); rows of z/y
    are contiguous, U_I's are [I, r]."""
    pid_m = tl.program_id(0)
    pid_i = tl.program_id(1)
    P = tl.load(nvalid_ptr)
    if pid_m * BM < P:  # blocks past this rank's pair count do nothing
        offs_m = pid_m * BM + tl.arange(0, BM)
        mmask = offs_m < P
        offs_i = pid_i * BI + tl.arange(0, BI)
        imask = offs_i < I
        rg = tl.arange(0, RGP)
        ru = tl.arange(0, RUP)
        rd = tl.arange(0, RDP)
        zg = tl.load(zg_ptr + offs_m[:, None] * RG + rg[None, :], mask=mmask[:, None] & (rg[None, :] < RG), other=0.0)
        ug = tl.load(ug_ptr + offs_i[:, None] * RG + rg[None, :], mask=imask[:, None] & (rg[None, :] < RG), other=0.0)
        g = tl.dot(zg.to(DOT), tl.trans(ug.to(DOT)), input_precision=PREC)  # [BM, BI]
        zu = tl.load(zu_ptr + offs_m[:, None] * RU + ru[None, :], mask=mmask[:, None] & (ru[None, :] < RU), other=0.0)
        uu = tl.load(uu_ptr + offs_i[:, None] * RU + ru[None, :], mask=imask[:, None] & (ru[None, :] < RU), other=0.0)
        u = tl.dot(zu.to(DOT), tl.trans(uu.to(DOT)), input_precision=PREC)
        if ACT == 0:
            act = g * tl.sigmoid(g)
        elif ACT == 1:
            act = 0.5 * g * (1.0 + tl.erf(g * 0.7071067811865476))
        else:
            inner = 0.7978845608028654 * (g + 0.044715 * g * g * g)
            act = 0.5 * g * (1.0 + (2.0 * tl.sigmoid(2.0 * inner) - 1.0))
        a = act * u  # [BM, BI] float32
        ud = tl.load(ud_ptr + offs_i[:, None] * RD + rd[None, :], mask=imask[:, None] & (rd[None, :] < RD), other=0.0)
        y = tl.dot(a.to(DOT), ud.to(DOT), input_precision=PREC)  # [BM, RDP]
        tl.atomic_add(y_ptr + offs_m[:, None] * RD + rd[None, :], y, mask=mmask[:, None] & (rd[None, :] < RD))


def pair_blocks(expert: torch.Tensor, n_local: int, block: int, grouped: bool):
    """Blocks of pairs of one expert, with static shapes.

    expert [P] local expert per pair, ``n_local`` (or more) for pairs this rank does not
    compute. Returns rows [NB * block] (pair index or -1), slots [NB * block] (the pair's
    compact row: its position among this rank's pairs in expert order), block_expert [NB]
    (-1: skip) and the number of this rank's pairs [1] (int32, on the device).
    ``grouped=False``: NB = P, one pair per block, in order, slot = pair (decoding, every
    pair this rank's: no sort). ``grouped=True``: pairs sorted by expert, each expert's
    pairs padded to whole blocks; NB = ceil(P / block) + n_local, an upper bound, unused
    blocks are -1."""
    P = expert.numel()
    dev = expert.device
    if not grouped:
        rows = torch.full((P, block), -1, dtype=torch.int32, device=dev)
        rows[:, 0] = torch.arange(P, dtype=torch.int32, device=dev)
        be = torch.where(expert < n_local, expert, torch.full_like(expert, -1)).to(torch.int32)
        rows = rows.reshape(-1)
        return rows, rows, be, torch.full((1,), P, dtype=torch.int32, device=dev)
    key = expert.clamp(max=n_local)  # other ranks' pairs last
    sorted_key, order = torch.sort(key, stable=True)
    counts = torch.zeros(n_local + 1, dtype=torch.int64, device=dev)
    counts.index_add_(0, key, torch.ones_like(key))
    counts = counts[:n_local]
    padded = (counts + block - 1) // block * block
    pend = torch.cumsum(padded, 0)
    pstart = pend - padded
    start = torch.cumsum(counts, 0) - counts
    nb = (P + block - 1) // block + n_local
    k = sorted_key.clamp(max=n_local - 1)
    position = torch.arange(P, device=dev)
    dest = pstart[k] + position - start[k]
    dest = torch.where(sorted_key < n_local, dest, torch.full_like(dest, nb * block))  # dump slot
    rows = torch.full((nb * block + 1,), -1, dtype=torch.int32, device=dev)
    rows.scatter_(0, dest, order.to(torch.int32))
    slots = torch.full((nb * block + 1,), -1, dtype=torch.int32, device=dev)
    slots.scatter_(0, dest, position.to(torch.int32))
    starts = torch.arange(nb, device=dev) * block
    block_expert = torch.searchsorted(pend, starts, right=True)
    block_expert = torch.where(block_expert < n_local, block_expert, torch.full_like(block_expert, -1))
    n_pairs = counts.sum().reshape(1).to(torch.int32)
    return rows[: nb * block], slots[: nb * block], block_expert.to(torch.int32), n_pairs


def _pow2(n: int) -> int:
    return max(16, triton.next_power_of_2(int(n)))


class PairBlocks:
    """The pair blocks of one call and the kernels' launch settings, from static shapes.

    expert [P] local expert per pair (``n_local`` or more: not computed here), n_local
    experts, topk K. ``grouped``: sorted by expert (default when P > 64 or when some pairs
    are another rank's: ``split``; one pair per block otherwise)."""

    def __init__(self, expert: torch.Tensor, n_local: int, topk: int, dtype: torch.dtype, grouped: bool | None = None,
                 split: bool = False):
        P = expert.numel()
        self.P, self.topk = P, topk
        self.grouped = (P > 64 or split) if grouped is None else grouped
        self.BM = 16 if not self.grouped or P <= 1024 else 64
        self.rows, self.slots, self.block_expert, self.n_pairs = pair_blocks(expert, n_local, self.BM, self.grouped)
        if interpreting() or dtype == torch.float32:  # the interpreter cannot dot bfloat16 operands
            self.dot, self.prec = tl.float32, "ieee"
        else:
            self.dot, self.prec = _TL_DTYPES[dtype], "tf32"

    def matmul(self, a: torch.Tensor, weights: torch.Tensor, out: torch.Tensor, *, transposed: bool = False,
               scatter_weights: torch.Tensor | None = None) -> torch.Tensor:
        """Per pair p of expert e at compact row slot(p): ``out[slot] = a[p // K] @ W[e]``,
        or with ``scatter_weights`` w [P]: ``out[p // K] += w_p a[slot] @ W[e]`` (atomic;
        out float32). ``weights`` is [E, k, n], or [E, n, k] with ``transposed``; a and out
        have unit last stride."""
        kd, n = (weights.shape[2], weights.shape[1]) if transposed else (weights.shape[1], weights.shape[2])
        sk, sn = (weights.stride(2), weights.stride(1)) if transposed else (weights.stride(1), weights.stride(2))
        BN, BK = min(64, _pow2(n)), min(64, _pow2(kd))
        scatter = scatter_weights is not None
        w = scatter_weights if scatter else self.block_expert  # unused pointer when storing
        _core_kernel[(self.block_expert.numel(), triton.cdiv(n, BN))](
            a, weights, out, self.rows, self.slots, self.block_expert, w,
            n, kd, self.topk,
            a.stride(0), weights.stride(0), sk, sn, out.stride(0),
            BM=self.BM, BN=BN, BK=BK, SCATTER=scatter, DOT=self.dot, PREC=self.prec)
        return out


def triton_partial(f: ExpertFactors, xg: torch.Tensor, xu: torch.Tensor, expert: torch.Tensor,
                   weight: torch.Tensor, top_k: int, *, grouped: bool | None = None) -> torch.Tensor:
    """This rank's ``s`` [T, r_H,d] through the Triton kernels, from the projected input
    ``xg``, ``xu`` [T, r_H] and each pair's local expert (``f.n_experts``: another rank's)
    and weight [P]. ``grouped``: pair blocks sorted by expert (default: see PairBlocks)."""
    if f.act not in ACT_IDS:
        raise BackendError(f"activation {f.act!r} has no Triton kernel; use TUCKERIZE_KERNEL=grouped or gather")
    T = xg.shape[0]
    P = expert.numel()
    dtype = f.dtype
    blocks = PairBlocks(expert, f.n_experts, top_k, dtype, grouped, split=f.split)
    dev = xg.device
    z = {}
    for p, xs in (("gate", xg), ("up", xu)):
        # rows past this rank's pair count are never written nor read by the kernels below;
        # in the ungrouped (decode) blocks every row is written
        z[p] = blocks.matmul(xs.contiguous(), f.G[p], torch.empty(P, f.G[p].shape[2], dtype=dtype, device=dev))
    ug, uu, ud = (f.U_I[p].contiguous() for p in ("gate", "up", "down"))
    I_loc = ug.shape[0]
    RG, RU, RD = ug.shape[1], uu.shape[1], ud.shape[1]
    y = torch.zeros(P, RD, dtype=torch.float32, device=dev)
    BI = 16 if P <= 64 else 64
    BMA = 16 if P <= 1024 else 64
    _act_kernel[(triton.cdiv(P, BMA), triton.cdiv(I_loc, BI))](
        z["gate"], z["up"], ug, uu, ud, y, blocks.n_pairs,
        I_loc, RG, RU, RD,
        BM=BMA, BI=BI, RGP=_pow2(RG), RUP=_pow2(RU), RDP=_pow2(RD),
        ACT=ACT_IDS[f.act], DOT=blocks.dot, PREC=blocks.prec)
    y = y.to(dtype)
    Gd = f.G["down"]  # [E_loc, r_H,d, r_I,d]: y @ Gd[e]^T
    s = torch.zeros(T, Gd.shape[1], dtype=torch.float32, device=dev)
    blocks.matmul(y, Gd, s, transposed=True, scatter_weights=weight.contiguous())
    return s.to(dtype)

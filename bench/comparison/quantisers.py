"""Round-to-nearest of the dense experts, and the stored bytes of every scalar-quantised form.

Byte conventions (every quantised row, whoever made it):

* RTN, GPTQ, AWQ (llmcompressor's packed form): ``bits`` per weight, packed without padding
  (``ceil(rows * cols * bits / 8)`` bytes per matrix), plus one float16 scale and one float16
  zero per group; groups of ``g = min(group, in_features)`` consecutive values of a row along
  the input axis (a shorter last group when ``g`` does not divide ``in_features``).
* HQQ (``hqq.core.quantize.Quantizer``, axis 1, as HQQ stores it): the matrix is flattened and
  cut into groups of ``group`` consecutive values (``rows * cols / group`` groups, which span
  rows when ``group > in_features``); codes packed as HQQ packs them (2 bits: four per uint8;
  4 bits: two per uint8; 3 bits: ten per int32, so 3.2 bits per weight, the last int32 row
  padded), plus a float16 scale and a float16 zero per group (HQQ's zero is not rounded at 2 and
  3 bits, so it is a float).
"""

from __future__ import annotations

import math

import torch

SCALE_ZERO_BYTES = 4  # float16 scale + float16 zero per group


def rtn_matrix_bytes(rows: int, cols: int, bits: int, group: int) -> int:
    g = min(group, cols)
    return math.ceil(rows * cols * bits / 8) + rows * math.ceil(cols / g) * SCALE_ZERO_BYTES


def hqq_matrix_bytes(rows: int, cols: int, bits: int, group: int) -> int:
    if (rows * cols) % group:
        raise ValueError(f"HQQ needs the group ({group}) to divide the matrix ({rows} x {cols})")
    groups = rows * cols // group
    if bits == 3:
        codes = math.ceil(groups / 10) * group * 4
    elif bits in (1, 2, 4, 8):
        codes = groups * group * bits // 8
    else:
        raise ValueError(f"HQQ {bits}-bit storage is not counted here")
    return codes + groups * SCALE_ZERO_BYTES


def expert_matrices(d) -> list[tuple[int, int]]:
    """``(rows, cols)`` of every routed-expert matrix of ``d`` (gate/up ``[I, H]``, down ``[H, I]``)."""
    return [(d.I, d.H), (d.I, d.H), (d.H, d.I)] * (d.E * len(d.layers))


def quantised_bytes(d, scheme: str, bits: int, group: int) -> int:
    """The stored bytes of ``d``'s routed experts under ``scheme`` (``rtn`` for RTN, GPTQ and
    AWQ, ``hqq``)."""
    count = {"rtn": rtn_matrix_bytes, "hqq": hqq_matrix_bytes}[scheme]
    return sum(count(r, c, bits, group) for r, c in expert_matrices(d))


def rtn_matrix(w: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """Asymmetric round-to-nearest of ``w [out, in]``, groups along the input axis
    (``min(group, in)``), float16 scale and zero per group; returns the dequantised float32."""
    from tuckerize.quant import group_view

    w = w.float()
    rows, cols = w.shape
    qmax = 2**bits - 1
    gv, _ = group_view(w, group)
    lo, hi = gv.amin(-1, keepdim=True), gv.amax(-1, keepdim=True)
    scale = ((hi - lo) / qmax).clamp_min(1e-12).half().float()
    zero = torch.round(-lo / scale).clamp(0, qmax).half().float()
    q = torch.clamp(torch.round(gv / scale) + zero, 0, qmax)
    return ((q - zero) * scale).view(rows, -1)[:, :cols]


def rtn(d, bits: int, group: int = 128) -> tuple[dict, int]:
    """RTN of every routed-expert matrix of ``d`` (:class:`comparison.dense.Dense`).
    Returns (tensors, bytes)."""
    t = dict(d.tensors)
    for layer in d.layers:
        for p in ("gate", "up", "down"):
            for e in range(d.E):
                n = d.name(layer, p, e)
                t[n] = rtn_matrix(t[n], bits, group).to(t[n].dtype).contiguous()
    return t, quantised_bytes(d, "rtn", bits, group)

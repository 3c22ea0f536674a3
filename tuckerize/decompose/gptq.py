"""GPTQ: quantisation with error feedback on a quadratic output-error model.

For a linear map ``y = W x`` (``W [out, in]``) and the input covariance ``C = sum_t x x^T``
(``[in, in]``), the output error of a perturbation ``dW`` is ``tr(dW C dW^T)``: every row of
``W`` is one quadratic problem over its ``in`` values. GPTQ (Frantar et al., 2022) quantises
the input columns one at a time in a fixed order and, after each, moves the columns not yet
quantised to the optimum of the quadratic given the ones fixed so far (the Optimal Brain
Surgeon update):

    err   = (w_j - q_j) / [C^{-1}]_jj          (with C^{-1} restricted to the columns left)
    w_F  -= err [C^{-1}]_{j, F}

The restricted inverses are the rows of the upper Cholesky factor ``U`` of ``C^{-1}``
(``C^{-1} = U^T U``), so one factorisation serves every step; updates are applied lazily per
block of columns. The result equals a direct solve of each step's constrained least squares
(the test compares the two in float64).

Groups: ``group_axis="in"`` (GPTQ's own): scale and zero per group of ``g`` consecutive input
columns of each row, fitted (:func:`tuckerize.quant_grid.fit`) from the updated values
when the group's first column is reached; ``scale [..., out, n_groups]``.
``group_axis="out"``: scale and zero per group of ``g`` consecutive rows of each input
column, fitted from that column's updated values when it is reached;
``scale [..., in, n_groups]`` (the layout of a stored tensor ``W^T`` grouped along its last
axis, e.g. a Tucker factor ``U_H [H, r_H]`` whose input axis is H).

Batched: ``W [..., out, in]`` with one covariance for all (``[in, in]``) or one each
(``[..., in, in]``: every expert its own). The covariance is ridged by ``damp`` times its
mean eigenvalue (:func:`tuckerize.decompose.expert_weighted.ridge`: an expert without tokens
gets the batch's floor, never a singular matrix; no column is zeroed). Pure tensor maths.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tuckerize.decompose.expert_weighted import ridge
from tuckerize.quant_grid import Grid, codes, dequantize, fit, groups, round_to_grid

#: Ridge of the covariance relative to its mean eigenvalue (GPTQ's ``percdamp``).
DEFAULT_DAMP = 0.01
#: Columns per lazy update (rounded up to a multiple of the group size).
BLOCK = 128


@dataclass
class Quantised:
    """GPTQ's result for ``W [..., out, in]``: ``codes`` (integers as float, ``W``'s shape),
    ``scale``/``zero`` (``[..., out, n]`` for ``group_axis="in"``, ``[..., in, n]`` for
    ``"out"``), the dequantised ``weight`` and the grid."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    weight: torch.Tensor
    grid: Grid
    group_axis: str


def _upper_inverse_factor(C: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(C + ridge)^{-1}`` (``[..., in, in]``)."""
    L = torch.linalg.cholesky(ridge(C, damp))
    inv = torch.cholesky_inverse(L)
    return torch.linalg.cholesky(inv, upper=True)


def gptq(W: torch.Tensor, C: torch.Tensor, grid: Grid, *, group_axis: str = "in", damp: float = DEFAULT_DAMP,
         block: int = BLOCK) -> Quantised:
    """Quantise ``W [..., out, in]`` on ``grid`` with error feedback by ``C`` (``[in, in]`` or
    ``[..., in, in]``; module docstring). Computed in ``W``'s dtype (float32 or float64)."""
    if group_axis not in ("in", "out"):
        raise ValueError(f"group_axis {group_axis!r} is not 'in' or 'out'")
    if W.ndim < 2 or C.shape[-1] != W.shape[-1] or C.shape[-2] != W.shape[-1]:
        raise ValueError(f"covariance {tuple(C.shape)} does not match the input axis of W {tuple(W.shape)}")
    dtype = W.dtype
    W = W.clone()
    n_out, n_in = W.shape[-2:]
    U = _upper_inverse_factor(C.to(W.device, torch.float64), damp).to(dtype)  # [..., in, in]
    g = min(grid.group, n_in if group_axis == "in" else n_out)
    if group_axis == "in":
        block = g * max(1, -(-block // g))
        n_groups = -(-n_in // g)
        scale = W.new_zeros(*W.shape[:-1], n_groups)
    else:
        n_groups = -(-n_out // g)
        scale = W.new_zeros(*W.shape[:-2], n_in, n_groups)
    zero = torch.zeros_like(scale)
    Q = torch.zeros_like(W)
    for i1 in range(0, n_in, block):
        i2 = min(i1 + block, n_in)
        W1 = W[..., i1:i2].clone()
        Err = torch.zeros_like(W1)
        U1 = U[..., i1:i2, i1:i2]
        s = z = None
        for i in range(i2 - i1):
            col = i1 + i
            w = W1[..., i]  # [..., out]
            if group_axis == "in":
                if col % g == 0:
                    k = col // g
                    s, z = fit(W1[..., i : i + g], grid)  # [..., out]
                    scale[..., k], zero[..., k] = s, z
                q = dequantize(codes(w[..., None], s, z, grid), s, z)[..., 0]
            else:
                gw = groups(w, g)  # [..., n_groups, g]
                sc, zc = fit(gw, grid)
                scale[..., col, :], zero[..., col, :] = sc, zc
                q = dequantize(codes(gw, sc, zc, grid), sc, zc).reshape(*w.shape[:-1], -1)[..., :n_out]
            Q[..., col] = q
            d = U1[..., i, i]
            err = (w - q) / d[..., None]
            W1[..., i:] -= err[..., None] * U1[..., i, i:].unsqueeze(-2)
            Err[..., i] = err
        W[..., i2:] -= Err @ U[..., i1:i2, i2:]
    return Quantised(codes=_codes_of(Q, scale, zero, grid, group_axis, g), scale=scale, zero=zero, weight=Q,
                     grid=grid, group_axis=group_axis)


def _codes_of(Q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, grid: Grid, group_axis: str,
              g: int) -> torch.Tensor:
    """The integer codes of the dequantised values ``Q`` (exact: ``Q`` lies on the grid)."""
    if group_axis == "in":
        s = scale.repeat_interleave(g, -1)[..., : Q.shape[-1]]
        z = zero.repeat_interleave(g, -1)[..., : Q.shape[-1]]
    else:
        s = scale.repeat_interleave(g, -1)[..., : Q.shape[-2]].transpose(-1, -2)
        z = zero.repeat_interleave(g, -1)[..., : Q.shape[-2]].transpose(-1, -2)
    q = torch.where(s > 0, torch.round(Q / s.clamp_min(torch.finfo(torch.float16).tiny) + z), torch.round(z))
    return q.clamp(grid.qmin, grid.qmax)


def rtn(W: torch.Tensor, grid: Grid, *, group_axis: str = "in") -> Quantised:
    """Round to nearest on the same grids (no error feedback): the reference GPTQ improves on."""
    if group_axis == "in":
        q, s, z, Q = round_to_grid(W, grid)
    else:
        q, s, z, Q = round_to_grid(W.transpose(-1, -2), grid)
        q, Q = q.transpose(-1, -2), Q.transpose(-1, -2)
    return Quantised(codes=q.contiguous(), scale=s, zero=z, weight=Q.contiguous(), grid=grid, group_axis=group_axis)


def output_error(W: torch.Tensor, W_hat: torch.Tensor, C: torch.Tensor) -> float:
    """``sum tr((W - W_hat) C (W - W_hat)^T)`` over the batch (float64)."""
    D = (W - W_hat).to(torch.float64)
    return float((torch.matmul(D, C.to(torch.float64)) * D).sum())


__all__ = ["Quantised", "gptq", "rtn", "output_error", "DEFAULT_DAMP", "BLOCK"]

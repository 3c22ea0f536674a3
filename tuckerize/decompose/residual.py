"""Quantised experts plus a Tucker residual shared across the layer's experts.

One projection's experts ``T [E, H, I]`` (semantic axes) are approximated by

    W_e ~ Q_e + U_H G_e U_I^T

with ``Q_e`` each expert on an integer grid (2 or 3 bits, groups along its input axis, the
layout of a dense quantised checkpoint: gate/up ``Q_e^T [I, H]``, down ``Q_e [H, I]``) and a
Tucker residual at ranks ``(E, r_H, r_I)`` whose ``U_H``, ``U_I`` are shared by all experts.
The objective is the two-sided weighted output error of
:mod:`tuckerize.decompose.expert_weighted`,

    f(Q, R) = sum_e tr(D_e^T A_e D_e B_e),      D = T - Q - R,

and it is fitted by alternation (as CALDERA alternates a quantised base and low-rank factors):

1. ``Q = GPTQ(T - R)`` against the base's input covariance (gate/up: ``A``, the routed hidden
   covariance; down: ``B_e``, each expert's own down-input covariance);
2. ``R = ``weighted Tucker of ``T - Q`` (alternating least squares, warm-started from the
   previous residual: it never increases f for fixed Q).

GPTQ minimises the input-side error only, so step 1 is kept only when it lowers f; the
alternation stops at the first round that does not. ``f`` therefore never increases.
``init="tucker"`` starts with ``R`` the Tucker fit of ``T`` itself (the residual first, the
base quantising what the shared structure leaves); ``init="base"`` with ``R = 0``.

:func:`fit_quantised` then quantises the residual's factors and cores
(:func:`tuckerize.decompose.factor_quant.quantise_tucker`, the refit included) and
re-quantises the base once against the quantised residual, kept if it lowers f. Pure tensor
maths in float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch

from tuckerize.decompose.expert_weighted import expert_weighted_tucker, weighted_objective
from tuckerize.decompose.factor_quant import QuantisedTucker, StoredCodes, quantise_tucker, stored_codes
from tuckerize.decompose.gptq import DEFAULT_DAMP, gptq
from tuckerize.quant_grid import Grid
from tuckerize.decompose.tucker import TuckerTensor


@dataclass
class BaseResidual:
    """``base``: the base's codes in its stored layout ``[E, out, in]`` (gate/up ``[E, I, H]``,
    down ``[E, H, I]``); ``base_weight``: the dequantised base ``[E, H, I]``; ``residual``: the
    Tucker residual (``U_E [E, E]``, ``U_H [H, r_H]``, ``U_I [I, r_I]``, core ``[E, r_H, r_I]``) or
    None at rank 0; ``history``: the relative weighted error ``sqrt(f / f(0))`` after each
    accepted step."""

    base: StoredCodes
    base_weight: torch.Tensor
    residual: TuckerTensor | None
    history: list[float] = field(default_factory=list)
    quantised: QuantisedTucker | None = None

    def reconstruction(self) -> torch.Tensor:
        """``Q + R`` ``[E, H, I]`` (the residual as quantised when :attr:`quantised` is set)."""
        if self.quantised is not None:
            f = self.quantised.factors
            return self.base_weight + TuckerTensor(core=f["core"], factors=[f["U_E"], f["U_H"], f["U_I"]]).to_tensor()
        if self.residual is None:
            return self.base_weight
        return self.base_weight + self.residual.to_tensor()


def base_orientation(side: str):
    """``(to stored, from stored)``: ``[E, H, I]`` <-> the base's ``[E, out, in]``."""
    if side == "H":
        return (lambda t: t.transpose(1, 2)), (lambda t: t.transpose(1, 2))
    if side == "I":
        return (lambda t: t), (lambda t: t)
    raise ValueError(f"side {side!r} is not 'H' (gate/up) or 'I' (down)")


def _base(T_minus_R: torch.Tensor, C: torch.Tensor, grid: Grid, side: str, damp: float):
    to_stored, from_stored = base_orientation(side)
    q = gptq(to_stored(T_minus_R).contiguous(), C, grid, group_axis="in", damp=damp)
    return stored_codes(q, transposed=False), from_stored(q.weight).contiguous()


def fit_base_residual(T: torch.Tensor, rank: Sequence[int] | None, A: torch.Tensor | None, B: torch.Tensor,
                      grid: Grid, *, side: str, rounds: int = 2, init: str = "base", als_iters: int = 3,
                      damp: float = DEFAULT_DAMP, base_cov: torch.Tensor | None = None) -> BaseResidual:
    """The alternation of the module docstring for ``T [E, H, I]``: ``rank`` ``(E, r_H, r_I)``
    of the residual (None: the base alone, GPTQ once); ``A`` the hidden-side weight (None,
    ``[H, H]`` or ``[E, H, H]``), ``B [E, I, I]`` the intermediate-side weight; ``side`` the
    base's input axis (``"H"`` gate/up, ``"I"`` down); ``rounds`` base steps at most;
    ``base_cov``: the covariance GPTQ quantises the base with (default ``A`` for gate/up,
    ``B`` for down; e.g. the unridged statistics, GPTQ adds its own ridge ``damp``)."""
    if init not in ("base", "tucker"):
        raise ValueError(f"init {init!r} is not 'base' or 'tucker'")
    f64 = torch.float64
    T = T.to(f64)
    A = None if A is None else A.to(f64)
    B = B.to(f64)
    C = base_cov.to(f64) if base_cov is not None else (A if side == "H" else B)
    if C is None:
        raise ValueError("gate/up's base needs the hidden-side covariance A")
    f0 = weighted_objective(T, A, B) or 1.0

    def rel(recon: torch.Tensor) -> float:
        return math.sqrt(max(0.0, weighted_objective(T, A, B, recon)) / f0)

    res: TuckerTensor | None = None
    R = torch.zeros_like(T)
    if rank is not None and init == "tucker":
        res = expert_weighted_tucker(T, rank, A, B, iters=als_iters)
        R = res.to_tensor()
    best, history = math.inf, []
    base = base_w = None
    for _ in range(max(1, rounds)):
        b, bw = _base(T - R, C, grid, side, damp)
        err = rel(bw + R)
        if err >= best:
            break
        base, base_w, best = b, bw, err
        history.append(err)
        if rank is None:
            break
        res = expert_weighted_tucker(T - base_w, rank, A, B, init=res, iters=als_iters)
        R = res.to_tensor()
        best = rel(base_w + R)
        history.append(best)
    assert base is not None and base_w is not None
    return BaseResidual(base=base, base_weight=base_w, residual=res, history=history)


def fit_quantised(T: torch.Tensor, rank: Sequence[int] | None, A: torch.Tensor | None, B: torch.Tensor,
                  grid: Grid, factor_grids: Mapping[str, Grid | None], *, side: str, rounds: int = 2,
                  init: str = "base", als_iters: int = 3, damp: float = DEFAULT_DAMP,
                  factor_method: str = "gptq", base_cov: torch.Tensor | None = None) -> BaseResidual:
    """:func:`fit_base_residual`, then the residual's factors and cores quantised on
    ``factor_grids`` (``{"U_H", "U_I", "core"}``) by ``factor_method`` and the base
    quantised once more against the quantised residual (kept when it lowers the error)."""
    out = fit_base_residual(T, rank, A, B, grid, side=side, rounds=rounds, init=init, als_iters=als_iters, damp=damp,
                            base_cov=base_cov)
    if out.residual is None:
        return out
    T64 = T.to(torch.float64)
    A64 = None if A is None else A.to(torch.float64)
    B64 = B.to(torch.float64)
    f0 = weighted_objective(T64, A64, B64) or 1.0
    res = out.residual
    out.quantised = quantise_tucker(T64 - out.base_weight, res.factors, res.core, A64, B64, factor_grids, side=side,
                                    method=factor_method, damp=damp)
    f = out.quantised.factors
    R = TuckerTensor(core=f["core"], factors=[f["U_E"], f["U_H"], f["U_I"]]).to_tensor()
    err = math.sqrt(max(0.0, weighted_objective(T64, A64, B64, out.base_weight + R)) / f0)
    out.history.append(err)
    C = base_cov.to(torch.float64) if base_cov is not None else (A64 if side == "H" else B64)
    b, bw = _base(T64 - R, C, grid, side, damp)
    err2 = math.sqrt(max(0.0, weighted_objective(T64, A64, B64, bw + R)) / f0)
    if err2 < err:
        out.base, out.base_weight = b, bw
        out.history.append(err2)
    return out


__all__ = ["BaseResidual", "base_orientation", "fit_base_residual", "fit_quantised"]

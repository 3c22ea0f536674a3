"""Calibrated quantisation of one projection's Tucker factors and cores.

A projection's experts ``T [E, H, I]`` (semantic axes) are approximated by
``W_e = U_H G_e U_I^T`` (``r_E = E``: the per-expert cores ``G [E, r_H, r_I]`` are free; a
square ``U_E`` is folded into them, ``G = U_E core``, and stored as the identity). Storing
``U_H``, ``U_I`` and ``G`` on integer grids, each one is quantised by GPTQ
(:mod:`tuckerize.decompose.gptq`) against the covariance of its own input, in the order the
data flows, each after the ones before it are quantised:

``side="H"`` (gate/up: ``y_e = ((x U_H) G_e) U_I^T``, input covariance ``A`` of x):

* ``U_H`` as the map ``x -> x U_H``: ``W = U_H^T``, covariance ``A`` (mean over experts if per expert);
* the cores are refitted to the quantised ``U_H`` and ``U_I`` ... (below), then
  ``G_e`` as the map ``z -> z G_e`` (``z = x Q_H``): ``W = G_e^T``, covariance ``Q_H^T A_e Q_H``;
* ``U_I`` as ``t -> t U_I^T`` (``t = z G_e``): ``W = U_I``, covariance ``mean_e G_e^T Q_H^T A_e Q_H G_e``;

``side="I"`` (down: ``y_e = ((a U_I) G_e^T) U_H^T``, per-expert input covariances ``B_e`` of a):

* ``U_I`` (``W = U_I^T``, covariance ``sum_e B_e``), then ``U_H`` (``W = U_H``, covariance
  ``sum_e G_e Q_I^T B_e Q_I G_e^T``), then ``G_e`` (``W = G_e``, covariance ``Q_I^T B_e Q_I``).

Between the factors and the cores the cores are refitted to the quantised factors for the
two-sided weighted objective ``sum_e tr(D_e^T A_e D_e B_e)`` of
:mod:`tuckerize.decompose.expert_weighted` (its closed-form optimum for any full-rank
factors: :func:`weighted_cores`). ``method="rtn"`` rounds each to nearest on the
same grids instead (the refit kept): the comparison GPTQ is measured against.

Every grid groups the stored tensor along its last axis (``U_H [H, r_H]`` along r_H, the core
``[E, r_H, r_I]`` along r_I), the layout of :mod:`tuckerize.quant`; where that axis is the
output of the map above, GPTQ runs with ``group_axis="out"``. Pure tensor maths, float64.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch

from tuckerize.decompose.gptq import DEFAULT_DAMP, Quantised, gptq, rtn
from tuckerize.quant_grid import Grid


@dataclass
class StoredCodes:
    """A tensor ``X`` on a grid, in ``X``'s own layout: ``codes`` (``X``'s shape, integer
    values), ``scale``/``zero`` ``[*X.shape[:-1], n_groups]`` (groups along the last axis)."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    grid: Grid

    def dequantize(self) -> torch.Tensor:
        g = min(self.grid.group, self.codes.shape[-1])
        n = self.codes.shape[-1]
        s = self.scale.repeat_interleave(g, -1)[..., :n]
        z = self.zero.repeat_interleave(g, -1)[..., :n]
        return (self.codes - z) * s


def stored_codes(q: Quantised, transposed: bool) -> StoredCodes:
    """The stored layout of GPTQ's result on ``W = X`` (``transposed=False``, grouped along
    the input) or ``W = X^T`` (``transposed=True``, grouped along the output)."""
    if transposed != (q.group_axis == "out"):
        raise ValueError("a stored tensor groups along its last axis: W = X needs group_axis 'in', W = X^T 'out'")
    c = q.codes.transpose(-1, -2) if transposed else q.codes
    return StoredCodes(codes=c.contiguous(), scale=q.scale, zero=q.zero, grid=q.grid)


@dataclass
class QuantisedTucker:
    """``factors``: ``U_E`` (identity), ``U_H``, ``U_I``, ``core`` as a reader gets them back
    (float64); ``stored``: the grids' codes of those quantised (:class:`StoredCodes`)."""

    factors: dict[str, torch.Tensor]
    stored: dict[str, StoredCodes]


def _mean_cov(W: torch.Tensor | None, d: int, like: torch.Tensor) -> torch.Tensor:
    if W is None:
        return torch.eye(d, dtype=like.dtype, device=like.device)
    return W.mean(0) if W.ndim == 3 else W


def _per_expert(W: torch.Tensor | None, U: torch.Tensor, E: int) -> torch.Tensor:
    """``U^T W_e U`` [E, r, r] (identity weight when W is None)."""
    if W is None:
        return (U.T @ U).expand(E, -1, -1)
    P = U.T @ torch.matmul(W, U)
    return P.expand(E, -1, -1) if P.ndim == 2 else P


def weighted_cores(T: torch.Tensor, A: torch.Tensor | None, B: torch.Tensor | None, UH: torch.Tensor,
                   UI: torch.Tensor) -> torch.Tensor:
    """The cores ``[E, r_H, r_I]`` minimising ``sum_e tr(D_e^T A_e D_e B_e)``,
    ``D_e = T_e - U_H G_e U_I^T``, for any full-column-rank ``U_H [H, r_H]``, ``U_I [I, r_I]``
    (quantised factors are not orthonormal): ``G_e = P_e^{-1} U_H^T A_e T_e B_e U_I Q_e^{-1}``,
    ``P_e = U_H^T A_e U_H``, ``Q_e = U_I^T B_e U_I`` (None: identity weight)."""
    E = T.shape[0]
    AU = UH if A is None else torch.matmul(A, UH)  # [H, rH] or [E, H, rH]
    BU = UI if B is None else torch.matmul(B, UI)  # [I, rI] or [E, I, rI]
    R = torch.matmul(torch.matmul(AU.transpose(-1, -2), T), BU)  # [E, rH, rI]
    P = _per_expert(A, UH, E)
    Q = _per_expert(B, UI, E)
    G = torch.linalg.solve(P, R)
    return torch.linalg.solve(Q, G.transpose(1, 2)).transpose(1, 2)


def _quantise(W: torch.Tensor, C: torch.Tensor, grid: Grid, axis: str, method: str, damp: float) -> Quantised:
    return gptq(W, C, grid, group_axis=axis, damp=damp) if method == "gptq" else rtn(W, grid, group_axis=axis)


def quantise_tucker(T: torch.Tensor, factors: list[torch.Tensor], core: torch.Tensor, A: torch.Tensor | None,
                    B: torch.Tensor | None, grids: Mapping[str, Grid | None], *, side: str, method: str = "gptq",
                    refit: bool = True, damp: float = DEFAULT_DAMP) -> QuantisedTucker:
    """Quantise ``U_H``, ``U_I`` and the per-expert cores of ``T [E, H, I] ~ (factors, core)``
    (``U_E [E, E]`` square, ``U_H [H, r_H]``, ``U_I [I, r_I]``, ``core [E, r_H, r_I]``) on
    ``grids`` (``{"U_H", "U_I", "core"}``; None keeps a tensor unquantised) with the weights
    ``A`` (None, ``[H, H]`` or ``[E, H, H]``) and ``B`` (None or ``[E, I, I]``) of the weighted
    objective; ``side``: the input axis (``"H"`` gate/up, ``"I"`` down; module docstring)."""
    if side not in ("H", "I") or method not in ("gptq", "rtn"):
        raise ValueError(f"side {side!r} / method {method!r}: expected 'H' or 'I' / 'gptq' or 'rtn'")
    E, H, I = T.shape
    if factors[0].shape != (E, E):
        raise ValueError(f"calibrated factor quantisation needs r_E = E (a square U_E), got {tuple(factors[0].shape)}")
    f64 = torch.float64
    T = T.to(f64)
    A = None if A is None else A.to(f64)
    B = None if B is None else B.to(f64)
    UH, UI = factors[1].to(f64), factors[2].to(f64)
    G = torch.einsum("ea,abc->ebc", factors[0].to(f64), core.to(f64))
    stored: dict[str, StoredCodes] = {}

    def quant_factor(name: str, U: torch.Tensor, C: torch.Tensor, as_input_map: bool) -> torch.Tensor:
        """``as_input_map``: U is applied as ``v -> v U`` (W = U^T, grouped along the output)."""
        grid = grids.get(name)
        if grid is None:
            return U
        W = U.T if as_input_map else U
        q = _quantise(W, C, grid, "out" if as_input_map else "in", method, damp)
        stored[name] = stored_codes(q, transposed=as_input_map)
        return stored[name].dequantize()

    if side == "H":
        QH = quant_factor("U_H", UH, _mean_cov(A, H, T), True)
        P = _per_expert(A, QH, E)  # [E, rH, rH]
        C_t = torch.einsum("eab,eac,ecd->bd", G, P, G) / E  # mean_e G_e^T P_e G_e  [rI, rI]
        QI = quant_factor("U_I", UI, C_t, False)
    else:
        QI = quant_factor("U_I", UI, _mean_cov(B, I, T), True)
        Qe = _per_expert(B, QI, E)  # [E, rI, rI]
        C_s = torch.einsum("eab,ebc,edc->ad", G, Qe, G)  # sum_e G_e Q_e G_e^T  [rH, rH]
        QH = quant_factor("U_H", UH, C_s, False)
    if refit and (("U_H" in stored) or ("U_I" in stored)):
        G = weighted_cores(T, A, B, QH, QI)
    grid = grids.get("core")
    if grid is not None:
        if side == "H":
            q = _quantise(G.transpose(1, 2), _per_expert(A, QH, E), grid, "out", method, damp)
            stored["core"] = stored_codes(q, transposed=True)
        else:
            q = _quantise(G, _per_expert(B, QI, E), grid, "in", method, damp)
            stored["core"] = stored_codes(q, transposed=False)
        G = stored["core"].dequantize()
    eye = torch.eye(E, dtype=f64, device=T.device)
    return QuantisedTucker(factors={"U_E": eye, "U_H": QH, "U_I": QI, "core": G}, stored=stored)


__all__ = ["StoredCodes", "QuantisedTucker", "quantise_tucker", "stored_codes", "weighted_cores"]

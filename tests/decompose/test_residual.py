"""Quantised base + shared Tucker residual (tuckerize.decompose.residual) and the calibrated
quantisation of Tucker factors (tuckerize.decompose.factor_quant), against float64 maths."""

from __future__ import annotations

import math

import pytest
import torch

from tuckerize.decompose.expert_weighted import weighted_objective
from tuckerize.decompose.factor_quant import quantise_tucker
from tuckerize.quant_grid import Grid
from tuckerize.decompose.residual import fit_base_residual, fit_quantised
from tuckerize.decompose.tucker import TuckerTensor, tucker


def _problem(E=6, H=24, I=12, seed=0, noise=0.3):
    """Experts sharing a low-rank structure plus their own noise, two-sided SPD weights."""
    g = torch.Generator().manual_seed(seed)
    d = torch.float64
    UH, UI = torch.linalg.qr(torch.randn(H, 4, generator=g, dtype=d))[0], torch.linalg.qr(torch.randn(I, 4, generator=g, dtype=d))[0]
    T = torch.einsum("ha,eab,ib->ehi", UH, 3 * torch.randn(E, 4, 4, generator=g, dtype=d), UI)
    T = T + noise * torch.randn(E, H, I, generator=g, dtype=d)
    x = torch.randn(400, H, generator=g, dtype=d) * torch.logspace(0, -1, H, dtype=d)
    A = x.T @ x / 400
    B = torch.stack([(lambda y: y.T @ y / 200)(torch.randn(200, I, generator=g, dtype=d)) for _ in range(E)])
    return T, A, B


def _rel(T, A, B, recon):
    return math.sqrt(weighted_objective(T, A, B, recon) / weighted_objective(T, A, B))


@pytest.mark.parametrize("side,init", [("H", "base"), ("I", "base"), ("H", "tucker")])
def test_alternation_never_increases_the_objective(side, init):
    T, A, B = _problem()
    Aw = A if side == "H" else None
    out = fit_base_residual(T, (6, 4, 4), Aw, B, Grid(bits=2, group=8), side=side, rounds=4, init=init)
    h = out.history
    assert len(h) >= 2
    assert all(b <= a + 1e-12 for a, b in zip(h, h[1:])), h
    assert h[-1] == pytest.approx(_rel(T, Aw, B, out.reconstruction()), rel=1e-9)
    base_alone = fit_base_residual(T, None, Aw, B, Grid(bits=2, group=8), side=side)
    assert _rel(T, Aw, B, out.reconstruction()) < 0.8 * _rel(T, Aw, B, base_alone.reconstruction())
    # the base is on its grid, in the stored orientation [E, out, in]
    stored = out.base.dequantize()
    assert torch.allclose(stored.transpose(1, 2) if side == "H" else stored, out.base_weight, atol=1e-12)
    assert out.base.codes.min() >= 0 and out.base.codes.max() <= 3


def test_quantised_residual_close_to_unquantised():
    T, A, B = _problem(seed=1)
    grids = {"U_H": Grid(8, 128, symmetric=True), "U_I": Grid(8, 128, symmetric=True), "core": Grid(4, 128, symmetric=True)}
    out = fit_quantised(T, (6, 4, 4), A, B, Grid(bits=2, group=8), grids, side="H")
    exact = fit_base_residual(T, (6, 4, 4), A, B, Grid(bits=2, group=8), side="H")
    q, e = _rel(T, A, B, out.reconstruction()), _rel(T, A, B, exact.reconstruction())
    assert q == pytest.approx(out.history[-1], rel=1e-9)
    assert q < 1.15 * e


@pytest.mark.parametrize("side", ["H", "I"])
def test_calibrated_factor_quantisation(side):
    """GPTQ with the weighted refit beats round to nearest on the same grids; the refit
    (without quantising the core) is the weighted least-squares optimum given the factors."""
    T, A, B = _problem(seed=2, noise=0.0)  # exactly rank (6, 4, 4): every error is the quantisation's
    Aw = A if side == "H" else None
    res = tucker(T, (6, 4, 4))
    grids = {"U_H": Grid(3, 8, symmetric=False), "U_I": Grid(3, 8, symmetric=False), "core": Grid(3, 8)}
    errs = {}
    for method in ("gptq", "rtn"):
        q = quantise_tucker(T, res.factors, res.core, Aw, B, grids, side=side, method=method)
        f = q.factors
        errs[method] = _rel(T, Aw, B, TuckerTensor(core=f["core"], factors=[f["U_E"], f["U_H"], f["U_I"]]).to_tensor())
        assert set(q.stored) == {"U_H", "U_I", "core"}
        assert torch.allclose(q.stored["U_H"].dequantize(), f["U_H"], atol=1e-12)
    assert errs["gptq"] < errs["rtn"]
    # refit only: compare with a direct float64 least squares per expert on the weighted problem
    q = quantise_tucker(T, res.factors, res.core, Aw, B, {**grids, "core": None}, side=side)
    QH, QI, G = q.factors["U_H"], q.factors["U_I"], q.factors["core"]
    Aq = torch.eye(T.shape[1], dtype=torch.float64) if Aw is None else Aw
    for e in range(T.shape[0]):
        SA, SB = torch.linalg.cholesky(Aq), torch.linalg.cholesky(B[e])
        # min || SA^T (T_e - QH X QI^T) SB ||: Kronecker least squares
        M = torch.kron(SB.T @ QI, SA.T @ QH)
        x = torch.linalg.lstsq(M, (SA.T @ T[e] @ SB).T.reshape(-1, 1)).solution
        ref = x.reshape(QI.shape[1], QH.shape[1]).T
        assert torch.linalg.norm(G[e] - ref) <= 1e-8 * torch.linalg.norm(ref)

"""Tucker with per-expert, two-sided output weights (alternating least squares).

The pooled whitening of :mod:`tuckerize.decompose.whiten` gives every expert the same
input covariance. That is right for the hidden side of gate/up (all experts read the same
residual-stream coordinates) but not for the intermediate side: neuron ``i`` of expert
``e`` and neuron ``i`` of expert ``f`` are unrelated, so a covariance pooled over experts
is close to isotropic and whitening with it does little (BENCHMARKS.md, calibration).

Here each expert slice ``T_e`` ([H, I], semantic axes) carries its own weights on both
sides and the objective is

    f = sum_e tr(D_e^T A_e D_e B_e),      D_e = T_e - U_H G_e U_I^T,

the first-order calibration-set error of the MoE block output when ``A_e`` is the
(routed) covariance of the projection's input side and ``B_e`` the sensitivity of the
block output to its output side:

* down (input on I): ``A = 1``, ``B_e = sum_{t->e} w^2 a a^T`` (expert e's own inputs);
* up: ``A`` = routed hidden covariance, ``B_e = (W_down,e^T W_down,e) o sum w^2 s s^T``
  with ``s = act(g)``; gate the same with ``s = u * act'(g)`` (``o``: Hadamard; a PSD
  Kronecker approximation of ``E[w^2 (x x^T) (x) (s s^T)]``, the output error is
  ``||sum_i s_i (x dW_i) d_i||^2``).

``A`` may be None, one [H, H] matrix for all experts, or [E, H, H]; ``B`` the same on I.
With the expert-mode rank r_E = E the cores are free per expert and the alternation is
exact block coordinate descent (the objective never increases):

* cores: ``G_e = P_e^{-1} R_e Q_e^{-1}`` with ``P_e = U_H^T A_e U_H``,
  ``Q_e = U_I^T B_e U_I``, ``R_e = U_H^T A_e T_e B_e U_I``;
* U_H: ``sum_e A_e X M_e = sum_e A_e T_e B_e U_I G_e^T``, ``M_e = G_e Q_e G_e^T``; with a
  shared A it cancels (``X = N (sum M_e)^{-1}``), per-expert A is solved by conjugate
  gradients with a Kronecker preconditioner; then ``X = QR``, R goes into the cores;
* U_I: the same with the roles of the sides exchanged.

r_E < E: the alternation runs with free cores, then the expert mode is truncated on the
Gram matrix of the weighted cores ``P_e^{1/2} G_e Q_e^{1/2}`` and the cores are projected
orthogonally (an approximation of the weighted problem, which has no closed form there).

Factors come back orthonormal with the core in the original space: the checkpoint
format and the runtime are unchanged. All arithmetic in float64, or in float32 where the
caller asks (``dtype``: devices without float64, e.g. NPU; :func:`solver_dtype` gives the
default for a device; the float32 result is compared with float64 in the tests).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from tuckerize.decompose.tucker import TuckerTensor, orthonormal_columns, squared_norm, tucker

__all__ = ["ridge", "expert_weighted_tucker", "solver_dtype", "weighted_objective"]

#: Device types without float64 arithmetic: the solver runs there in float32.
NO_FLOAT64 = ("npu", "mps")


def solver_dtype(device) -> torch.dtype:
    """float64 where ``device`` has it, else float32 (:data:`NO_FLOAT64`)."""
    kind = device.type if isinstance(device, torch.device) else str(device).split(":")[0]
    return torch.float32 if kind in NO_FLOAT64 else torch.float64

#: Conjugate-gradient stopping rule (relative residual) and iteration cap. Each CG iterate
#: from the warm start lowers the objective (CG minimises the quadratic over a growing
#: Krylov space that contains the start), so an inexact step keeps the alternation
#: monotone; on the demo models the residual falls tenfold every ~5 iterations.
CG_TOL = 1e-6
CG_MAX_ITERS = 100


def ridge(cov: torch.Tensor, damp: float) -> torch.Tensor:
    """``C + damp * mean eigenvalue(C) * 1`` for one [d, d] or a batch [E, d, d] of
    covariances (float64, symmetrised). A matrix with zero trace (an expert no calibration
    token reached) gets a ridge of ``1e-3 * damp`` times the batch's mean eigenvalue, so
    every result is positive definite unless the whole batch is zero (then identity)."""
    c = cov.to(torch.float64)
    c = 0.5 * (c + c.transpose(-1, -2))
    d = c.shape[-1]
    mean = torch.diagonal(c, dim1=-2, dim2=-1).sum(-1) / d  # [E] or []
    floor = 1e-3 * float(mean.mean()) if mean.numel() else 0.0
    if not floor > 0:
        return torch.eye(d, dtype=torch.float64, device=c.device).expand_as(c).clone()
    lam = max(damp, 1e-12) * torch.clamp(mean, min=floor)
    return c + lam[..., None, None] * torch.eye(d, dtype=torch.float64, device=c.device)


def _left(W: torch.Tensor | None, X: torch.Tensor) -> torch.Tensor:
    """``W_e X_e`` for W None (identity), [d, d] (shared) or [E, d, d]."""
    return X if W is None else torch.matmul(W, X)


def _gram(W: torch.Tensor | None, U: torch.Tensor) -> torch.Tensor:
    """``U^T W_e U``: [r, r] for W None/shared, [E, r, r] per expert."""
    if W is None:
        return torch.eye(U.shape[1], dtype=U.dtype, device=U.device)
    return U.T @ torch.matmul(W, U)


def _solve_sym(P: torch.Tensor, X: torch.Tensor, side: str) -> torch.Tensor:
    """``P^{-1} X`` (side 'left') or ``X P^{-1}`` (side 'right') for SPD P, batched or not."""
    if side == "left":
        return torch.linalg.solve(P, X)
    return torch.linalg.solve(P, X.transpose(-1, -2)).transpose(-1, -2)


def _cores(T, A, B, UH, UI):
    """Per-expert optimal cores [E, r_H, r_I] and the terms R_e (for the objective)."""
    BU = _left(B, UI)  # [I, rI] or [E, I, rI]
    Y = torch.matmul(T, BU)  # [E, H, rI]
    R = UH.T @ _left(A, Y)  # [E, rH, rI]
    P, Q = _gram(A, UH), _gram(B, UI)
    G = _solve_sym(P, _solve_sym(Q, R, "right"), "left")
    return G, R, P, Q


def weighted_objective(T: torch.Tensor, A, B, recon: torch.Tensor | None = None,
                       dtype: torch.dtype = torch.float64) -> float:
    """``sum_e tr(D_e^T A_e D_e B_e)`` with ``D = T - recon`` (``D = T`` without ``recon``),
    in ``dtype`` (float64 unless the device has none)."""
    D = (T if recon is None else T - recon).to(dtype)
    return float((_left(A, D) * _left(B, D.transpose(1, 2)).transpose(1, 2)).sum())


def _solve_sum_kron(L: torch.Tensor, M: torch.Tensor, N: torch.Tensor, X0: torch.Tensor) -> torch.Tensor:
    """``sum_e L_e X M_e = N`` for SPD L_e [E, d, d], M_e [E, r, r]: preconditioned CG
    (preconditioner: the same equation with L, M replaced by their means, solved exactly
    by two eigendecompositions)."""
    la, va = torch.linalg.eigh(L.mean(0))
    lm, vm = torch.linalg.eigh(M.mean(0))
    den = la[:, None] * lm[None, :]

    def prec(R):
        return va @ ((va.T @ R @ vm) / den) @ vm.T

    def op(X):
        return torch.matmul(torch.matmul(L, X), M).sum(0)

    X = X0.clone()
    R = N - op(X)
    Z = prec(R)
    P = Z.clone()
    rz = float((R * Z).sum())
    n0 = float(N.norm()) or 1.0
    for _ in range(CG_MAX_ITERS):
        if float(R.norm()) <= CG_TOL * n0:
            break
        AP = op(P)
        alpha = rz / float((P * AP).sum())
        X = X + alpha * P
        R = R - alpha * AP
        Z = prec(R)
        rz_new = float((R * Z).sum())
        P = Z + (rz_new / rz) * P
        rz = rz_new
    return X


def _factor_step(T, Wside, Wother, U_other, G, U_self, per_expert_side: bool) -> torch.Tensor:
    """New (unnormalised) factor of one side given the other side's factor and the cores.

    Written for the H side: T [E, H, I], Wside = A, Wother = B, U_other = U_I, G [E, rH, rI];
    the I side calls it with T transposed and G transposed."""
    Q = _gram(Wother, U_other)  # [rI, rI] or [E, rI, rI]
    M = torch.matmul(torch.matmul(G, Q), G.transpose(1, 2))  # [E, rH, rH]
    BUG = torch.matmul(_left(Wother, U_other), G.transpose(1, 2))  # [E, I, rH]
    N0 = torch.matmul(T, BUG)  # [E, H, rH]: T_e B_e U_I G_e^T
    if not per_expert_side:  # shared or no weight on this side: it cancels
        return torch.linalg.solve(M.sum(0), N0.sum(0).T).T
    N = torch.matmul(Wside, N0).sum(0)
    return _solve_sum_kron(Wside, M, N, U_self)


def expert_weighted_tucker(
    tensor: torch.Tensor,
    rank: Sequence[int],
    A: torch.Tensor | None,
    B: torch.Tensor | None,
    *,
    init: TuckerTensor | None = None,
    iters: int = 3,
    dtype: torch.dtype = torch.float64,
) -> TuckerTensor:
    """Tucker decomposition of ``tensor`` [E, H, I] at ``rank`` minimising the per-expert
    two-sided weighted error (module docstring). ``init``: factors to start from (default:
    plain Tucker); ``iters``: alternation sweeps (each sweep updates U_H, U_I and the cores).

    Returns orthonormal factors and the core in the original space (``dtype`` of the
    input) with ``relative_error`` (weight space), ``whitened_error`` (``sqrt(f / f_0)``,
    f_0 the objective of a zero approximation: the relative weighted output error) and
    ``error_history`` (that relative weighted error after the initialisation and each sweep).

    Runs on ``tensor``'s device in ``dtype``: float64 (default), or float32 for a device
    without float64 (:func:`solver_dtype`); the weight-space error is then computed on the CPU.
    """
    from tuckerize.decompose.whiten import _reconstruct_error

    if tensor.ndim != 3:
        raise ValueError(f"expected an [E, H, I] tensor, got shape {tuple(tensor.shape)}")
    E, H, I = tensor.shape
    rE, rH, rI = (int(r) for r in rank)
    if not (1 <= rE <= E and 1 <= rH <= H and 1 <= rI <= I):
        raise ValueError(f"rank {tuple(rank)} does not fit shape {tuple(tensor.shape)}")
    for name, W, d in (("A", A, H), ("B", B, I)):
        if W is not None and (W.shape[-1] != d or W.shape[-2] != d or (W.ndim == 3 and W.shape[0] != E) or W.ndim not in (2, 3)):
            raise ValueError(f"weight {name} has shape {tuple(W.shape)}; expected [{d}, {d}] or [{E}, {d}, {d}]")
    if dtype not in (torch.float64, torch.float32):
        raise ValueError(f"solver dtype {dtype} is not float64 or float32")
    wd = dtype
    dtype, device = tensor.dtype, tensor.device
    T = tensor.to(wd)
    A = None if A is None else A.to(device, wd)
    B = None if B is None else B.to(device, wd)
    if init is None:
        init = tucker(tensor, (E, rH, rI))
    UH = orthonormal_columns(init.factors[1].to(device, wd))[0]
    UI = orthonormal_columns(init.factors[2].to(device, wd))[0]

    f0 = weighted_objective(T, A, B, dtype=wd)
    f0 = f0 if f0 > 0 else 1.0

    def rel_white(G, R) -> float:
        # at the optimal cores: f = f0 - sum_e <G_e, R_e>
        return math.sqrt(max(0.0, f0 - float((G * R).sum())) / f0)

    G, R, P, Q = _cores(T, A, B, UH, UI)
    history = [rel_white(G, R)]
    for _ in range(iters):
        X = _factor_step(T, A, B, UI, G, UH, A is not None and A.ndim == 3)
        UH = orthonormal_columns(X)[0]
        G, R, P, Q = _cores(T, A, B, UH, UI)
        X = _factor_step(T.transpose(1, 2), B, A, UH, G.transpose(1, 2), UI, B is not None and B.ndim == 3)
        UI = orthonormal_columns(X)[0]
        G, R, P, Q = _cores(T, A, B, UH, UI)
        history.append(rel_white(G, R))

    if rE == E:
        UE = torch.eye(E, dtype=wd, device=device)
        core = G
    else:
        # weighted cores P_e^{1/2} G_e Q_e^{1/2} choose the expert subspace
        def sqrt_psd(M):
            vals, vecs = torch.linalg.eigh(M)
            return (vecs * vals.clamp_min(0).sqrt().unsqueeze(-2)) @ vecs.transpose(-1, -2)

        Gw = torch.matmul(torch.matmul(sqrt_psd(P), G), sqrt_psd(Q)).reshape(E, -1)
        vals, vecs = torch.linalg.eigh(Gw @ Gw.T)
        UE = orthonormal_columns(vecs[:, -rE:].flip(1))[0]
        core = torch.einsum("ek,eab->kab", UE, G)
        Gp = torch.einsum("ek,kab->eab", UE, core)
        history.append(math.sqrt(max(0.0, weighted_objective(T, A, B, UH @ Gp @ UI.T, dtype=wd)) / f0))
    out = TuckerTensor(core=core.to(dtype), factors=[UE.to(dtype), UH.to(dtype), UI.to(dtype)],
                       error_history=history)
    x = tensor.to(torch.float32)
    fl = TuckerTensor(core=core.float(), factors=[UE.float(), UH.float(), UI.float()])
    if wd != torch.float64:  # the error is accumulated in float64: on the CPU
        x, fl = x.cpu(), TuckerTensor(core=fl.core.cpu(), factors=[f.cpu() for f in fl.factors])
    out.relative_error = _reconstruct_error(x, fl, squared_norm(x))
    out.whitened_error = history[-1]  # type: ignore[attr-defined]
    return out

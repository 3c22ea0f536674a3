"""Whitened (calibration-weighted) Tucker: minimise output error instead of weight error.

For one projection with input covariance ``C = sum_t x_t^T x_t`` (rows x of length d on
the input side of the weight), the squared output error of a perturbation dW is

    sum_t ||x_t dW||^2 = tr(dW^T C dW) = ||S dW||^2,      S = C^{1/2} (symmetric)

so decomposing the *whitened* tensor ``W' = W x_n S`` (mode-n product with S on the
input mode n) with ordinary Tucker minimises the calibration-set output error. Each mode
may carry its own weight (the hidden mode of gate/up, the intermediate mode of down,
optionally a diagonal expert weight on the expert mode).

Fold-back: Tucker of W' gives ``W' ~= core' x_n U'_n``. In the original space
``W ~= core' x_n (S_n^{-1} U'_n)``; with ``S_n^{-1} U'_n = Q_n R_n`` (QR), the factor
becomes ``Q_n`` (orthonormal columns again) and ``R_n`` is pushed into the core:
``core = core' x_n R_n``. The checkpoint format and the runtime are unchanged; the
reconstruction equals ``core' x_n (S_n^{-1} U'_n)`` exactly (up to rounding).

Rank-deficient statistics (few tokens, dead directions) never fail: the square root is
formed from a float64 symmetric eigendecomposition whose eigenvalues are clamped at 0
and then damped by ``damp * mean(eigenvalue)``; an all-zero covariance gives no
whitening (identity). No Cholesky factorisation or explicit inverse of C is formed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from tuckerize.decompose.tucker import TuckerTensor, mode_dot, orthonormal_columns, squared_norm, tucker

__all__ = ["Whitening", "whitening", "diagonal_whitening", "whiten", "fold_back", "whitened_tucker",
           "factor_errors", "mode_spectra", "DEFAULT_DAMP", "DEFAULT_ALLOC_DAMP"]

#: Ridge added to every eigenvalue of a covariance, relative to their mean, for the
#: decomposition. Measured on the demo models (BENCHMARKS.md, calibration section): held-out
#: perplexity at uniform ranks is lowest near 1 (0.01, a near-exact whitening, fits the
#: calibration set better and held-out text worse; 100 is close to plain Tucker).
DEFAULT_DAMP = 1.0
#: The same ridge for the spectra that rank allocation compares (measured best near 10:
#: a heavier prior that every input direction matters keeps gate/up from being cut too deep).
DEFAULT_ALLOC_DAMP = 10.0


@dataclass
class Whitening:
    """A symmetric positive definite weight ``S`` of one mode and its inverse (float64)."""

    S: torch.Tensor
    S_inv: torch.Tensor
    #: Eigenvalues of the damped covariance, descending (diagnostics).
    eigenvalues: torch.Tensor | None = None

    @property
    def dim(self) -> int:
        return self.S.shape[0]


def whitening(cov: torch.Tensor, damp: float = DEFAULT_DAMP) -> Whitening:
    """``S = (C + damp * mean(eig C) * 1)^{1/2}`` by a float64 symmetric eigendecomposition.

    Eigenvalues below 0 (rounding) are clamped to 0 before damping, so S is positive
    definite whenever C is nonzero; C = 0 gives S = identity.
    """
    if cov.ndim != 2 or cov.shape[0] != cov.shape[1]:
        raise ValueError(f"covariance must be square, got {tuple(cov.shape)}")
    c = cov.detach().to("cpu", torch.float64)
    if not bool(torch.isfinite(c).all()):
        raise ValueError("covariance contains NaN or Inf")
    c = 0.5 * (c + c.T)
    d = c.shape[0]
    vals, vecs = torch.linalg.eigh(c)
    vals = vals.clamp_min(0.0)
    mean = float(vals.mean())
    if mean <= 0.0 or not math.isfinite(mean):
        eye = torch.eye(d, dtype=torch.float64)
        return Whitening(eye, eye.clone(), torch.ones(d, dtype=torch.float64))
    # The floor also guards the eigenvalue clamp against float64 rounding of large spreads.
    vals = vals + max(damp, 1e-12) * mean
    root = vals.sqrt()
    S = (vecs * root) @ vecs.T
    S_inv = (vecs / root) @ vecs.T
    return Whitening(0.5 * (S + S.T), 0.5 * (S_inv + S_inv.T), vals.flip(0))


def diagonal_whitening(weights: torch.Tensor, floor: float = DEFAULT_DAMP) -> Whitening:
    """A diagonal mode weight ``diag(sqrt(w / mean w + floor))`` (e.g. per-expert traffic)."""
    w = weights.detach().to("cpu", torch.float64).clamp_min(0.0)
    mean = float(w.mean())
    if mean <= 0.0:
        eye = torch.eye(w.numel(), dtype=torch.float64)
        return Whitening(eye, eye.clone(), torch.ones(w.numel(), dtype=torch.float64))
    d = (w / mean + floor).sqrt()
    return Whitening(torch.diag(d), torch.diag(1.0 / d), (d * d).sort(descending=True).values)


def whiten(tensor: torch.Tensor, weights: Sequence[Whitening | None]) -> torch.Tensor:
    """``tensor x_n S_n`` for every mode that has a weight (computed in the tensor's dtype)."""
    out = tensor
    for mode, w in enumerate(weights):
        if w is not None:
            out = mode_dot(out, w.S.to(device=tensor.device, dtype=tensor.dtype), mode)
    return out


def fold_back(result: TuckerTensor, weights: Sequence[Whitening | None]) -> TuckerTensor:
    """Map a Tucker decomposition of the whitened tensor back to the original space.

    ``U_n = S_n^{-1} U'_n = Q_n R_n``; factor ``Q_n`` (orthonormal), ``core x_n R_n``.
    Done in float64, returned in the dtype of the input factors.
    """
    dtype = result.core.dtype
    device = result.core.device
    core = result.core.to(torch.float64)
    factors = []
    for mode, (factor, w) in enumerate(zip(result.factors, weights)):
        if w is None:
            factors.append(factor)
            continue
        q, r = orthonormal_columns(w.S_inv.to(device) @ factor.to(torch.float64))
        core = mode_dot(core, r, mode)
        factors.append(q.to(dtype))
    return TuckerTensor(core=core.to(dtype), factors=factors, relative_error=result.relative_error,
                        error_history=result.error_history)


def _reconstruct_error(tensor: torch.Tensor, result: TuckerTensor, norm2: float) -> float:
    """||T - T_hat|| / ||T||, explicit residual chunked along mode 0."""
    rest = result.core
    for mode in range(1, rest.ndim):
        rest = mode_dot(rest, result.factors[mode].to(rest.dtype), mode)
    rest = rest.reshape(rest.shape[0], -1)
    flat = tensor.reshape(tensor.shape[0], -1)
    step = max(1, (1 << 24) // max(1, rest.shape[1]))
    resid2 = 0.0
    u0 = result.factors[0].to(rest.dtype)
    for start in range(0, tensor.shape[0], step):
        block = u0[start : start + step] @ rest
        resid2 += float((flat[start : start + step].to(block.dtype) - block).double().pow(2).sum())
    return math.sqrt(resid2 / norm2) if norm2 > 0 else 0.0


def whitened_tucker(
    tensor: torch.Tensor,
    rank: Sequence[int],
    weights: Sequence[Whitening | None],
    *,
    compute_dtype: torch.dtype = torch.float32,
    **tucker_kwargs,
) -> TuckerTensor:
    """Tucker decomposition of ``tensor`` minimising ``||(T - T_hat) x_n S_n||``.

    Returns factors and core in the original space (orthonormal factors), with
    ``relative_error`` the relative error of the original tensor and the extra attribute
    ``whitened_error`` the relative error in the whitened space (the relative
    calibration-set output error, the quantity this decomposition minimises).
    Without any weight this is :func:`tuckerize.decompose.tucker` itself.
    """
    if len(weights) != tensor.ndim:
        raise ValueError(f"{len(weights)} mode weights for a tensor with {tensor.ndim} modes")
    for mode, w in enumerate(weights):
        if w is not None and w.dim != tensor.shape[mode]:
            raise ValueError(f"weight of mode {mode} has size {w.dim}, the tensor {tensor.shape[mode]}")
    if all(w is None for w in weights):
        result = tucker(tensor, rank, compute_dtype=compute_dtype, **tucker_kwargs)
        result.whitened_error = result.relative_error  # type: ignore[attr-defined]
        return result
    x = tensor.to(compute_dtype)
    xw = whiten(x, weights)
    result = tucker(xw, rank, compute_dtype=compute_dtype, **tucker_kwargs)
    whitened_error = result.relative_error
    del xw
    out = fold_back(result, weights)
    out.relative_error = _reconstruct_error(x, out, squared_norm(x))
    out.whitened_error = whitened_error  # type: ignore[attr-defined]
    return out


def factor_errors(tensor: torch.Tensor, factors: Sequence[torch.Tensor], core: torch.Tensor,
                  weights: Sequence[Whitening | None] | None = None) -> tuple[float, float | None]:
    """``(relative error, whitened relative error or None)`` of ``core x_n factors[n]``
    against ``tensor`` (float32 arithmetic, float64 sums)."""
    x = tensor.to(torch.float32)
    approx = TuckerTensor(core=core.to(torch.float32), factors=[f.to(torch.float32) for f in factors])
    rel = _reconstruct_error(x, approx, squared_norm(x))
    if weights is None or all(w is None for w in weights):
        return rel, None
    xw = whiten(x, weights)
    dense = whiten(approx.to_tensor(), weights)
    white = math.sqrt(squared_norm(xw - dense) / squared_norm(xw)) if squared_norm(xw) > 0 else 0.0
    return rel, white


def mode_spectra(tensor: torch.Tensor, weights: Sequence[Whitening | None] | None = None) -> list[torch.Tensor]:
    """Eigenvalues (descending, float64) of each mode's Gram matrix of the (whitened) tensor.

    ``sum(eig[r:])`` of mode n is the squared error of truncating mode n alone to rank r;
    the ST-HOSVD error is at most the sum of these tails over modes (the allocation's
    error model, :mod:`tuckerize.allocate`).
    """
    from tuckerize.decompose.tucker import _gram

    x = tensor.to(torch.float32)
    if weights is not None:
        x = whiten(x, weights)
    out = []
    for mode in range(x.ndim):
        g = _gram(x, mode).to(torch.float64)
        vals = torch.linalg.eigvalsh(0.5 * (g + g.T)).clamp_min(0.0).flip(0)
        out.append(vals)
    return out

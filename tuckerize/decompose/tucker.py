"""Tucker decomposition: sequentially truncated HOSVD through Gram matrices, then HOOI.

Vocabulary follows TensorLy: ``tucker(tensor, rank) -> TuckerTensor(core, factors)``;
the n-th factor has shape ``(tensor.shape[n], rank[n])`` with orthonormal columns and
``tensor ~= core x_0 factors[0] x_1 factors[1] ... ``.

Why Gram matrices: the leading left singular vectors of a mode-n unfolding
``Y_(n)`` (d_n x prod(other dims)) are the leading eigenvectors of the small
symmetric matrix ``Y_(n) Y_(n)^T`` (d_n x d_n). One matrix product plus one
symmetric eigensolve of size d_n replaces a full SVD of a d_n x (huge) matrix.
The Gram is formed in the compute dtype (float32) and eigen-solved in float64
when it is at most 1024 x 1024 (float32 above).

Sequential truncation: after each mode is solved the tensor is projected onto
its factor, so later modes work on a smaller tensor. The order matters: for the
(128, 2048, 768) expert tensor at ranks (64, 512, 256), E -> I -> H costs about
455 GFLOP and H first 1,140 GFLOP. :func:`cheapest_mode_order` tries every order.

Sign convention: each factor column is flipped so that its entry of largest
magnitude is positive, which makes the output deterministic.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

__all__ = [
    "TuckerTensor",
    "tucker",
    "hosvd",
    "hooi_sweep",
    "mode_dot",
    "cheapest_mode_order",
    "sthosvd_flops",
    "hooi_sweep_flops",
]


@dataclass
class TuckerTensor:
    """A Tucker decomposition: ``core`` of shape ``rank`` and one factor per mode."""

    core: torch.Tensor
    factors: list[torch.Tensor]
    #: Relative Frobenius error ||T - T_hat|| / ||T|| of the tensor it was fitted to.
    relative_error: float | None = None
    #: Relative error after each stage: the HOSVD, then each HOOI sweep.
    error_history: list[float] | None = None

    @property
    def rank(self) -> tuple[int, ...]:
        return tuple(self.core.shape)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(f.shape[0] for f in self.factors)

    def to_tensor(self) -> torch.Tensor:
        """Dense reconstruction ``core x_n factors[n]`` (for tests and small tensors)."""
        out = self.core
        for mode, factor in enumerate(self.factors):
            out = mode_dot(out, factor, mode)
        return out


def mode_dot(tensor: torch.Tensor, matrix: torch.Tensor, mode: int) -> torch.Tensor:
    """``tensor x_mode matrix``: contracts axis ``mode`` of ``tensor`` (size n) with
    axis 1 of ``matrix`` (shape (m, n)); the result has size m on that axis."""
    moved = torch.movedim(tensor, mode, -1)
    out = torch.matmul(moved, matrix.T.to(moved.dtype))
    return torch.movedim(out, -1, mode)


def _project(tensor: torch.Tensor, factor: torch.Tensor, mode: int) -> torch.Tensor:
    """``tensor x_mode factor^T`` with factor (d, r): size d on ``mode`` becomes r.

    Done as one matrix product on a reshaped view (no permuted copy of the tensor):
    mode 0 as ``F^T X``, the last mode as ``X F``, a middle mode as a batched ``F^T X_a``.
    """
    shape = list(tensor.shape)
    d, r = factor.shape
    f = factor.to(tensor.dtype)
    if mode == 0:
        out = f.T @ tensor.reshape(d, -1)
    elif mode == tensor.ndim - 1:
        out = tensor.reshape(-1, d) @ f
    else:
        a = math.prod(shape[:mode])
        out = torch.matmul(f.T, tensor.reshape(a, d, -1))
    shape[mode] = r
    return out.reshape(shape)


def _gram(tensor: torch.Tensor, mode: int) -> torch.Tensor:
    """``Y_(mode) Y_(mode)^T``: one large matrix product on the mode-``mode`` unfolding.

    For a middle mode the unfolding needs one permuted copy of the tensor; that copy
    costs far less than the batched alternative (many small products summed).
    """
    d = tensor.shape[mode]
    if mode == tensor.ndim - 1:
        unf = tensor.reshape(-1, d)
        return unf.T @ unf
    unf = tensor.reshape(d, -1) if mode == 0 else torch.movedim(tensor, mode, 0).reshape(d, -1)
    return unf @ unf.T


#: Gram matrices up to this size are eigen-solved in float64; larger ones (the hidden
#: mode, 2048+) in the compute dtype, where float64 would double the solve's time for
#: no measurable change in the decomposition error (BENCHMARKS.md).
FLOAT64_EIGH_MAX = 1024


def _leading_eigvecs(gram: torch.Tensor, rank: int) -> torch.Tensor:
    """Top-``rank`` eigenvectors of a symmetric PSD matrix, with fixed signs."""
    device = "cpu" if gram.device.type == "npu" else gram.device  # no eigensolver on NPU
    dtype = torch.float64 if gram.shape[0] <= FLOAT64_EIGH_MAX else gram.dtype
    g = gram.detach().to(device, dtype)
    g = 0.5 * (g + g.T)
    _, vecs = torch.linalg.eigh(g)  # ascending eigenvalues
    top = vecs[:, -rank:].flip(-1)
    return (top * column_signs(top)).to(device=gram.device, dtype=gram.dtype)


def column_signs(q: torch.Tensor) -> torch.Tensor:
    """+-1 per column making its largest-magnitude entry positive (the engine's sign convention)."""
    idx = q.abs().argmax(0)
    signs = torch.sign(q[idx, torch.arange(q.shape[1], device=q.device)])
    signs[signs == 0] = 1
    return signs


def orthonormal_columns(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``a = Q R`` (reduced QR) with Q in the engine's sign convention."""
    q, r = torch.linalg.qr(a)
    signs = column_signs(q)
    return q * signs, r * signs[:, None]


def sthosvd_flops(shape: Sequence[int], rank: Sequence[int], order: Sequence[int]) -> float:
    """Floating-point operations of ST-HOSVD (Gram products and projections) in ``order``."""
    dims = list(shape)
    flops = 0.0
    for mode in order:
        rest = math.prod(dims) // dims[mode]
        flops += 2.0 * dims[mode] ** 2 * rest  # Gram
        flops += 2.0 * rank[mode] * dims[mode] * rest  # projection
        dims[mode] = rank[mode]
    return flops


def cheapest_mode_order(shape: Sequence[int], rank: Sequence[int]) -> tuple[int, ...]:
    """The mode order with the fewest ST-HOSVD flops (all orders tried; ties keep 0,1,2...)."""
    orders = itertools.permutations(range(len(shape)))
    return min(orders, key=lambda o: sthosvd_flops(shape, rank, o))


def _projection_plan(shape: Sequence[int], rank: Sequence[int], skip: int) -> list[int]:
    """Order in which to project all modes except ``skip``: largest reduction first."""
    modes = [m for m in range(len(shape)) if m != skip]
    return sorted(modes, key=lambda m: rank[m] / shape[m])


def hooi_sweep_flops(shape: Sequence[int], rank: Sequence[int]) -> float:
    flops = 0.0
    for skip in range(len(shape)):
        dims = list(shape)
        for mode in _projection_plan(shape, rank, skip):
            flops += 2.0 * rank[mode] * math.prod(dims)
            dims[mode] = rank[mode]
        flops += 2.0 * dims[skip] ** 2 * (math.prod(dims) // dims[skip])
    return flops


def _check_rank(shape: Sequence[int], rank: Sequence[int]) -> tuple[int, ...]:
    if len(rank) != len(shape):
        raise ValueError(f"rank has {len(rank)} entries for a tensor with {len(shape)} modes")
    for mode, (r, d) in enumerate(zip(rank, shape)):
        if not 1 <= r <= d:
            raise ValueError(f"rank {r} of mode {mode} is outside 1..{d}")
    return tuple(int(r) for r in rank)


def squared_norm(tensor: torch.Tensor) -> float:
    """``||tensor||^2``: squares summed in rows of 4096 in the tensor's dtype, the row sums
    in float64 (about 1e-7 relative accuracy at a fraction of a float64 pass's cost)."""
    flat = tensor.reshape(-1)
    n = flat.numel()
    row = 4096
    total = 0.0
    step = row * 4096
    for i in range(0, n, step):
        chunk = flat[i : i + step]
        body = chunk.numel() - chunk.numel() % row
        if body:
            blk = chunk[:body].view(-1, row)
            total += float((blk * blk).sum(dim=1).double().sum())
        if body < chunk.numel():
            tail = chunk[body:].double()
            total += float((tail * tail).sum())
    return total


def _relative_error(
    tensor: torch.Tensor, core: torch.Tensor, factors: list[torch.Tensor], norm2: float, exact: bool
) -> float:
    core_norm2 = float(core.double().pow(2).sum())
    if not exact:
        return math.sqrt(max(norm2 - core_norm2, 0.0) / norm2) if norm2 > 0 else 0.0
    # Explicit residual, chunked along mode 0 to bound memory.
    resid2 = 0.0
    rest = core
    for mode in range(1, core.ndim):
        rest = mode_dot(rest, factors[mode], mode)
    rest = rest.reshape(core.shape[0], -1)
    step = max(1, (1 << 24) // max(1, rest.shape[1]))
    flat = tensor.reshape(tensor.shape[0], -1)
    for start in range(0, tensor.shape[0], step):
        block = factors[0][start : start + step] @ rest
        resid2 += float((flat[start : start + step] - block).double().pow(2).sum())
    return math.sqrt(resid2 / norm2) if norm2 > 0 else 0.0


def hosvd(
    tensor: torch.Tensor, rank: Sequence[int], order: Sequence[int] | None = None
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Sequentially truncated HOSVD. Returns ``(core, factors)``."""
    rank = _check_rank(tensor.shape, rank)
    order = tuple(order) if order is not None else cheapest_mode_order(tensor.shape, rank)
    factors: list[torch.Tensor | None] = [None] * tensor.ndim
    y = tensor
    for mode in order:
        factors[mode] = _leading_eigvecs(_gram(y, mode), rank[mode])
        y = _project(y, factors[mode], mode)
    return y, factors  # type: ignore[return-value]


def hooi_sweep(
    tensor: torch.Tensor, factors: list[torch.Tensor], rank: Sequence[int]
) -> list[torch.Tensor]:
    """One sweep of higher-order orthogonal iteration (Gauss-Seidel over modes)."""
    factors = list(factors)
    for mode in range(tensor.ndim):
        y = tensor
        for other in _projection_plan(tensor.shape, rank, mode):
            y = _project(y, factors[other], other)
        factors[mode] = _leading_eigvecs(_gram(y, mode), rank[mode])
    return factors


def _core(tensor: torch.Tensor, factors: list[torch.Tensor], rank: Sequence[int]) -> torch.Tensor:
    y = tensor
    for mode in _projection_plan(tensor.shape, rank, -1):
        y = _project(y, factors[mode], mode)
    return y


def tucker(
    tensor: torch.Tensor,
    rank: Sequence[int],
    *,
    n_iter_max: int = 0,
    tol: float = 1e-4,
    order: Sequence[int] | None = None,
    compute_dtype: torch.dtype = torch.float32,
    exact_error: bool | None = None,
    callback: Callable[[int, float], None] | None = None,
) -> TuckerTensor:
    """Tucker decomposition of ``tensor`` at multilinear ``rank``.

    Parameters
    ----------
    tensor : torch.Tensor
        Any shape; computed on its own device in ``compute_dtype``.
    rank : sequence of int
        One rank per mode, ``1 <= rank[n] <= tensor.shape[n]``.
    n_iter_max : int
        HOOI sweeps after the ST-HOSVD initialisation (0: ST-HOSVD only).
    tol : float
        Stop the sweeps when the relative error improves by less than ``tol``.
    order : sequence of int, optional
        ST-HOSVD mode order; by default the cheapest one (:func:`cheapest_mode_order`).
    exact_error : bool, optional
        Compute the reported error from an explicit residual instead of
        ``||T||^2 - ||core||^2`` (which loses precision below about 1e-3).
        By default explicit when the tensor is small or the error is below 1e-2.
    callback : callable, optional
        ``callback(stage, relative_error)`` after the HOSVD (stage 0) and each sweep.

    Returns
    -------
    TuckerTensor
        ``core`` of shape ``rank``; the n-th factor has shape ``(tensor.shape[n], rank[n])``
        with orthonormal columns.
    """
    rank = _check_rank(tensor.shape, rank)
    x = tensor.to(compute_dtype)
    norm2 = squared_norm(x)
    core, factors = hosvd(x, rank, order)

    def error(core_: torch.Tensor, factors_: list[torch.Tensor]) -> float:
        fast = _relative_error(x, core_, factors_, norm2, exact=False)
        explicit = exact_error if exact_error is not None else (fast < 1e-2 or x.numel() <= 1 << 22)
        return _relative_error(x, core_, factors_, norm2, exact=True) if explicit else fast

    history = [error(core, factors)]
    if callback:
        callback(0, history[-1])
    for sweep in range(n_iter_max):
        factors = hooi_sweep(x, factors, rank)
        core = _core(x, factors, rank)
        history.append(error(core, factors))
        if callback:
            callback(sweep + 1, history[-1])
        if history[-2] - history[-1] < tol * max(history[-2], 1e-30):
            break
    return TuckerTensor(core=core, factors=factors, relative_error=history[-1], error_history=history)

"""Per-expert two-sided weighted Tucker (tuckerize.decompose.expert_weighted) against
independent float64 mathematics.

The references here are numpy: the weighted objective from explicit per-expert matrix
square roots, each expert's optimal core from a Kronecker least-squares problem solved by
``numpy.linalg.lstsq``, plain HOOI from the engine's own ``tucker`` (identity weights).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tuckerize.decompose import tucker
from tuckerize.decompose.expert_weighted import expert_weighted_tucker, ridge
from tuckerize.decompose.whiten import whitened_tucker, whitening


def sqrtm(m: np.ndarray) -> np.ndarray:
    vals, vecs = np.linalg.eigh(0.5 * (m + m.T))
    return (vecs * np.sqrt(np.clip(vals, 0, None))) @ vecs.T


def objective(T, A, B, recon) -> float:
    """sum_e ||A_e^{1/2} (T_e - recon_e) B_e^{1/2}||_F^2 in numpy float64."""
    T, recon = np.asarray(T, dtype=np.float64), np.asarray(recon, dtype=np.float64)
    E, H, I = T.shape
    total = 0.0
    for e in range(E):
        a = np.eye(H) if A is None else np.asarray(A if A.ndim == 2 else A[e], dtype=np.float64)
        b = np.eye(I) if B is None else np.asarray(B if B.ndim == 2 else B[e], dtype=np.float64)
        total += np.linalg.norm(sqrtm(a) @ (T[e] - recon[e]) @ sqrtm(b)) ** 2
    return total


def problem(seed: int = 0, E: int = 6, H: int = 20, I: int = 12):
    """A random tensor with anisotropic, expert-specific weights on both sides."""
    g = torch.Generator().manual_seed(seed)
    T = torch.randn(E, H, I, generator=g)
    a = torch.randn(E, H, H, generator=g) * torch.logspace(0, -2, H)
    b = torch.stack([torch.randn(I, I, generator=g) * torch.logspace(0, -2, I)[torch.randperm(I, generator=g)]
                     for _ in range(E)])  # each expert has its own important directions
    return T, ridge(a @ a.transpose(1, 2), 0.01), ridge(b @ b.transpose(1, 2), 0.01)


def dense(res) -> np.ndarray:
    U_E, U_H, U_I = (f.double().numpy() for f in res.factors)
    return np.einsum("ea,hb,ic,abc->ehi", U_E, U_H, U_I, res.core.double().numpy())


@pytest.mark.parametrize("shared_A", [False, True])
def test_cores_are_the_per_expert_weighted_least_squares_solution(shared_A):
    T, A, B = problem(1)
    if shared_A:
        A = A.mean(0)
    res = expert_weighted_tucker(T, (6, 9, 7), A, B, iters=4)
    U_E, U_H, U_I = (f.double().numpy() for f in res.factors)
    assert np.allclose(U_E, np.eye(6), atol=1e-6)  # r_E = E: free cores
    for f in (U_H, U_I):
        assert np.allclose(f.T @ f, np.eye(f.shape[1]), atol=1e-5)
    G = np.einsum("ea,abc->ebc", U_E, res.core.double().numpy())
    for e in range(6):
        a = sqrtm((A if shared_A else A[e]).numpy())
        b = sqrtm(B[e].numpy())
        # vec(a U_H G U_I^T b) = kron(b U_I, a U_H) vec(G) (column-major vec)
        design = np.kron(b @ U_I, a @ U_H)
        target = (a @ T[e].double().numpy() @ b).reshape(-1, order="F")
        ref = np.linalg.lstsq(design, target, rcond=None)[0].reshape(G[e].shape, order="F")
        assert np.linalg.norm(G[e] - ref) / np.linalg.norm(ref) < 1e-4, e


def test_objective_decreases_and_matches_the_reference():
    T, A, B = problem(2)
    rank = (6, 8, 6)
    res = expert_weighted_tucker(T, rank, A, B, iters=8)
    hist = res.error_history
    assert all(b <= a + 1e-9 for a, b in zip(hist, hist[1:])), hist
    assert hist[-1] < 0.9 * hist[0]
    f0 = objective(T, A, B, np.zeros(T.shape))
    f = objective(T, A, B, dense(res))
    assert res.whitened_error == pytest.approx((f / f0) ** 0.5, rel=1e-5)
    assert res.relative_error == pytest.approx(np.linalg.norm(T.double().numpy() - dense(res)) / float(T.norm()),
                                               rel=1e-4)
    # better on its own objective than plain Tucker and than the pooled whitening
    plain = tucker(T, rank)
    pooled = whitened_tucker(T, rank, [None, whitening(A.mean(0)), whitening(B.mean(0))])
    assert f < 0.8 * objective(T, A, B, dense(plain))
    assert f < 0.8 * objective(T, A, B, dense(pooled))


def test_per_expert_and_shared_paths_agree():
    """A shared A given once ([H, H], closed-form step) or per expert ([E, H, H], CG)."""
    T, A, B = problem(3)
    shared = A[0]
    a = expert_weighted_tucker(T, (6, 9, 7), shared, B, iters=3)
    b = expert_weighted_tucker(T, (6, 9, 7), shared.expand(6, -1, -1).clone(), B, iters=3)
    assert np.linalg.norm(dense(a) - dense(b)) / np.linalg.norm(dense(a)) < 1e-6


def test_identity_weights_are_hooi():
    T, _, _ = problem(4)
    rank = (6, 8, 5)
    res = expert_weighted_tucker(T, rank, None, None, iters=30)
    st = tucker(T, rank)
    hooi = tucker(T, rank, n_iter_max=30, tol=0)
    assert res.relative_error <= st.relative_error + 1e-7
    assert res.relative_error == pytest.approx(hooi.relative_error, rel=1e-3)
    assert res.whitened_error == pytest.approx(res.relative_error, rel=1e-5)


def test_truncated_expert_mode():
    T, A, B = problem(5)
    rank = (3, 9, 7)
    res = expert_weighted_tucker(T, rank, A, B, iters=3)
    assert res.rank == rank and [tuple(f.shape) for f in res.factors] == [(6, 3), (20, 9), (12, 7)]
    for f in res.factors:
        f = f.double()
        assert torch.allclose(f.T @ f, torch.eye(f.shape[1], dtype=torch.float64), atol=1e-5)
    f = objective(T, A, B, dense(res))
    assert res.whitened_error == pytest.approx((f / objective(T, A, B, np.zeros(T.shape))) ** 0.5, rel=1e-5)
    assert f < objective(T, A, B, dense(tucker(T, rank)))


def test_ridge_keeps_every_weight_positive_definite():
    c = torch.zeros(4, 5, 5, dtype=torch.float64)
    v = torch.randn(3, 5, dtype=torch.float64)
    c[1] = v.T @ v  # rank 3 of 5; experts 0, 2, 3 saw no token
    r = ridge(c, 0.1)
    assert bool((torch.linalg.eigvalsh(r) > 0).all())
    assert torch.allclose(r[1], c[1] + 0.1 * torch.trace(c[1]) / 5 * torch.eye(5, dtype=torch.float64))
    assert torch.equal(ridge(torch.zeros(5, 5), 0.1), torch.eye(5, dtype=torch.float64))
    with pytest.raises(ValueError, match="weight B"):
        expert_weighted_tucker(torch.randn(4, 6, 5), (4, 3, 3), None, torch.eye(4, dtype=torch.float64))


@pytest.mark.parametrize("shared_A", [False, True])
def test_float32_solver_matches_float64(shared_A):
    """The float32 fallback (devices without float64): same objective as the float64 solver
    to 1e-4 relative (numpy float64 reference objective), orthonormal factors, the same
    output dtype; float64 stays the default and the choice for CPU/CUDA."""
    from tuckerize.decompose.expert_weighted import solver_dtype

    T, A, B = problem(4)
    if shared_A:
        A = A.mean(0)
    rank = (6, 8, 6)
    r64 = expert_weighted_tucker(T, rank, A, B, iters=4)
    r32 = expert_weighted_tucker(T, rank, A, B, iters=4, dtype=torch.float32)
    assert r32.core.dtype == r64.core.dtype == T.dtype
    for f in r32.factors[1:]:
        f = f.double().numpy()
        assert np.allclose(f.T @ f, np.eye(f.shape[1]), atol=1e-5)
    f64, f32 = objective(T, A, B, dense(r64)), objective(T, A, B, dense(r32))
    assert abs(f32 - f64) / f64 < 1e-4, (f32, f64)
    assert r32.whitened_error == pytest.approx(r64.whitened_error, rel=1e-4)
    assert r32.relative_error == pytest.approx(r64.relative_error, rel=1e-4)
    assert [solver_dtype(d) for d in ("cpu", "cuda", "npu:0", "mps")] == [torch.float64] * 2 + [torch.float32] * 2
    with pytest.raises(ValueError, match="float16"):
        expert_weighted_tucker(T, rank, A, B, dtype=torch.float16)

"""The Tucker engine against float64 mathematics and TensorLy.

References are built independently of the engine: exactly low-rank tensors from
a float64 core and factors, a float64 ST-HOSVD from numpy SVDs, and TensorLy's
own ``tucker`` (HOOI to convergence). Errors are relative Frobenius norms.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import tensorly as tl
import torch
from tensorly.decomposition import tucker as tl_tucker

from tuckerize.decompose.tucker import (
    cheapest_mode_order,
    hooi_sweep,
    hosvd,
    mode_dot,
    sthosvd_flops,
    tucker,
)

SHAPES = [
    ((8, 24, 12), (3, 6, 5)),
    ((6, 10, 14), (2, 4, 7)),
    ((12, 20, 16), (4, 8, 6)),
    ((5, 9, 7), (5, 9, 7)),  # full ranks
]
ORDERS = list(itertools.permutations(range(3)))


def rel_err(a, b) -> float:
    """||a - b|| / ||a|| in float64."""
    a = torch.as_tensor(np.asarray(a) if not isinstance(a, torch.Tensor) else a).double()
    b = torch.as_tensor(np.asarray(b) if not isinstance(b, torch.Tensor) else b).double()
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(a))


def low_rank(shape, rank, seed=0, noise=0.0, orthogonal=False) -> np.ndarray:
    """core x factors in float64 (unit norm), plus ``noise`` times a unit-norm Gaussian tensor."""
    rng = np.random.default_rng(seed)
    core = rng.standard_normal(rank)
    factors = []
    for d, r in zip(shape, rank):
        m = rng.standard_normal((d, r))
        factors.append(np.linalg.qr(m)[0] if orthogonal else m)
    t = np.einsum("abc,ia,jb,kc->ijk", core, *factors)
    t /= np.linalg.norm(t)
    if noise:
        n = rng.standard_normal(shape)
        t = t + noise * n / np.linalg.norm(n)
    return t


def reconstruct64(result) -> torch.Tensor:
    core = result.core.double()
    f = [u.double() for u in result.factors]
    return torch.einsum("abc,ia,jb,kc->ijk", core, *f)


def np_sthosvd(t: np.ndarray, rank, order):
    """Float64 ST-HOSVD from numpy SVDs of unfoldings: the textbook algorithm."""
    factors = [None] * t.ndim
    y = t
    for mode in order:
        unf = np.moveaxis(y, mode, 0).reshape(y.shape[mode], -1)
        u = np.linalg.svd(unf, full_matrices=False)[0][:, : rank[mode]]
        factors[mode] = u
        y = np.moveaxis(np.tensordot(u.T, np.moveaxis(y, mode, 0), axes=1), 0, mode)
    return y, factors


# ---------------------------------------------------------------- exact recovery


@pytest.mark.parametrize("shape,rank", SHAPES)
@pytest.mark.parametrize("order", ORDERS)
def test_exactly_low_rank_is_recovered(shape, rank, order):
    t64 = low_rank(shape, rank, seed=sum(shape) + order[0])
    x = torch.from_numpy(t64).float()
    result = tucker(x, rank, order=order)
    assert result.rank == tuple(rank)
    assert result.shape == tuple(shape)
    # Against the float32 input, and against the float64 truth it was rounded from.
    assert rel_err(x, reconstruct64(result)) < 1e-5
    assert rel_err(t64, reconstruct64(result)) < 1e-5
    assert result.relative_error < 1e-5


@pytest.mark.parametrize("orthogonal", [True, False])
def test_exact_recovery_with_hooi_and_explicit_error(orthogonal):
    shape, rank = (9, 16, 11), (4, 5, 6)
    x = torch.from_numpy(low_rank(shape, rank, seed=7, orthogonal=orthogonal)).float()
    for exact in (True, False, None):
        result = tucker(x, rank, n_iter_max=3, exact_error=exact)
        assert rel_err(x, result.to_tensor()) < 1e-5
    # The explicit residual is accurate near zero; the fast estimate cannot go below ~1e-3.
    assert tucker(x, rank, exact_error=True).relative_error < 1e-5


# ---------------------------------------------------------------- against references


@pytest.mark.parametrize("shape,rank", SHAPES[:3])
@pytest.mark.parametrize("order", [(0, 1, 2), (0, 2, 1), (2, 1, 0)])
def test_sthosvd_matches_float64_numpy_reference(shape, rank, order):
    """Same subspaces and same reconstruction as a float64 textbook ST-HOSVD in the same order."""
    t64 = low_rank(shape, rank, seed=11, noise=0.2)
    x = torch.from_numpy(t64).float()
    core, factors = hosvd(x, rank, order=order)
    ref_core, ref_factors = np_sthosvd(t64, rank, order)
    for u, ref in zip(factors, ref_factors):
        p = u.double() @ u.double().T
        p_ref = torch.from_numpy(ref @ ref.T)
        assert rel_err(p_ref, p) < 1e-4
    ref_rec = np.einsum("abc,ia,jb,kc->ijk", ref_core, *ref_factors)
    rec = torch.einsum("abc,ia,jb,kc->ijk", core.double(), *[f.double() for f in factors])
    assert rel_err(ref_rec, rec) < 1e-4
    # Core norm (sign-independent) agrees too.
    assert abs(float(core.double().norm()) - np.linalg.norm(ref_core)) < 1e-5 * np.linalg.norm(ref_core)


@pytest.mark.parametrize("shape,rank,noise", [((8, 24, 12), (3, 6, 5), 0.1), ((12, 20, 16), (4, 8, 6), 0.3)])
def test_no_worse_than_tensorly(shape, rank, noise):
    t64 = low_rank(shape, rank, seed=5, noise=noise)
    ref = tl_tucker(t64, rank=list(rank), init="svd", n_iter_max=200, tol=1e-12)
    err_tl = rel_err(t64, tl.tucker_to_tensor(ref))
    assert err_tl > 0.05  # a real approximation problem, not a trivially exact one
    x = torch.from_numpy(t64).float()
    hosvd_only = tucker(x, rank)
    with_hooi = tucker(x, rank, n_iter_max=50, tol=1e-10)
    for result, slack in ((hosvd_only, 1e-3), (with_hooi, 1e-4)):
        err = rel_err(t64, reconstruct64(result))
        assert err <= err_tl * (1 + slack), (err, err_tl)
    # Sweeps never make the fit worse than the HOSVD they start from.
    assert with_hooi.relative_error <= hosvd_only.relative_error * (1 + 1e-6)


def test_mode_dot_matches_tensorly():
    rng = np.random.default_rng(1)
    t = rng.standard_normal((4, 5, 6))
    for mode in range(3):
        m = rng.standard_normal((3, t.shape[mode]))
        ours = mode_dot(torch.from_numpy(t), torch.from_numpy(m), mode)
        theirs = tl.tenalg.mode_dot(t, m, mode)
        assert ours.shape == theirs.shape
        assert rel_err(theirs, ours) < 1e-12


# ---------------------------------------------------------------- properties


@pytest.mark.parametrize("iters", [0, 4])
def test_factors_orthonormal_signs_and_determinism(iters):
    shape, rank = (12, 20, 16), (4, 8, 6)
    x = torch.from_numpy(low_rank(shape, rank, seed=3, noise=0.5)).float()
    a = tucker(x, rank, n_iter_max=iters, tol=0.0)
    b = tucker(x.clone(), rank, n_iter_max=iters, tol=0.0)
    assert torch.equal(a.core, b.core)
    for fa, fb in zip(a.factors, b.factors):
        assert torch.equal(fa, fb)
    assert a.error_history == b.error_history
    for u, d, r in zip(a.factors, shape, rank):
        assert u.shape == (d, r) and u.dtype == torch.float32
        gram = u.double().T @ u.double()
        assert float((gram - torch.eye(r, dtype=torch.float64)).abs().max()) < 1e-5
        # Sign convention: the entry of largest magnitude in each column is positive.
        idx = u.abs().argmax(0)
        assert bool((u[idx, torch.arange(r)] > 0).all())
    assert a.core.shape == rank and a.core.dtype == torch.float32


def test_sign_convention_fixes_flipped_input_ambiguity():
    """Flipping the sign of a slice of the input flips the sign of U_E's row, not of columns."""
    shape, rank = (6, 10, 8), (3, 4, 5)
    x = torch.from_numpy(low_rank(shape, rank, seed=9, noise=0.3)).float()
    a = tucker(x, rank)
    b = tucker(-x, rank)  # -x: same subspaces; fixed signs force identical factors
    for fa, fb in zip(a.factors, b.factors):
        assert torch.allclose(fa, fb, atol=1e-5)
    assert torch.allclose(a.core, -b.core, atol=1e-5)


@pytest.mark.parametrize("exact", [True, False, None])
@pytest.mark.parametrize("noise", [0.05, 0.6])
def test_reported_error_equals_float64_error_of_reconstruction(exact, noise):
    shape, rank = (10, 18, 14), (3, 5, 4)
    x = torch.from_numpy(low_rank(shape, rank, seed=13, noise=noise)).float()
    for iters in (0, 3):
        result = tucker(x, rank, n_iter_max=iters, exact_error=exact, tol=0.0)
        truth = rel_err(x, result.to_tensor())
        assert truth > 0.01
        assert result.relative_error == pytest.approx(truth, rel=1e-4)
        assert result.error_history[-1] == result.relative_error


def test_hooi_error_is_non_increasing_and_reported_through_callback():
    rng = np.random.default_rng(17)
    x = torch.from_numpy(rng.standard_normal((8, 20, 14))).float()  # no low-rank structure
    rank = (3, 6, 5)
    seen: list[tuple[int, float]] = []
    result = tucker(x, rank, n_iter_max=8, tol=0.0, callback=lambda stage, err: seen.append((stage, err)))
    hist = result.error_history
    assert len(hist) >= 3, "HOOI stopped before doing any useful sweep"
    for before, after in zip(hist, hist[1:]):
        assert after <= before * (1 + 1e-6), hist
    assert hist[-1] < hist[0] * (1 - 1e-4), "sweeps should improve on ST-HOSVD for a random tensor"
    assert [s for s, _ in seen] == list(range(len(hist)))
    assert [e for _, e in seen] == pytest.approx(hist)
    # Each history entry is the true error of its stage: re-run the sweeps by hand.
    core, factors = hosvd(x, rank)
    manual = [rel_err(x, torch.einsum("abc,ia,jb,kc->ijk", core.double(), *[f.double() for f in factors]))]
    for _ in range(len(hist) - 1):
        factors = hooi_sweep(x, factors, rank)
        proj = x.double()
        for mode, f in enumerate(factors):
            proj = mode_dot(proj, f.double() @ f.double().T, mode)
        manual.append(rel_err(x, proj))
    assert manual == pytest.approx(hist, rel=1e-4)


def test_tol_stops_sweeps_early():
    x = torch.from_numpy(low_rank((8, 16, 12), (3, 4, 5), seed=2, noise=0.1)).float()
    result = tucker(x, (3, 4, 5), n_iter_max=50, tol=1e-2)
    assert 1 < len(result.error_history) < 51


# ---------------------------------------------------------------- costs


def test_cheapest_mode_order_and_flops_for_qwen3_30b_a3b():
    shape, rank = (128, 2048, 768), (64, 512, 256)
    assert cheapest_mode_order(shape, rank) == (0, 2, 1)  # E -> I -> H
    assert sthosvd_flops(shape, rank, (0, 2, 1)) == pytest.approx(455e9, rel=0.01)
    assert sthosvd_flops(shape, rank, (1, 2, 0)) == pytest.approx(1140e9, rel=0.01)  # H first
    cheapest = sthosvd_flops(shape, rank, (0, 2, 1))
    for order in ORDERS:
        assert sthosvd_flops(shape, rank, order) >= cheapest
        if order[0] == 1:
            assert sthosvd_flops(shape, rank, order) > 2 * cheapest


def test_sthosvd_flops_counts_gram_and_projection():
    # Independent count for (4, 6, 8) at ranks (2, 3, 4) in order 0, 1, 2.
    # mode 0: gram 2*4*4*48, proj 2*2*4*48; dims (2,6,8): gram 2*6*6*16, proj 2*3*6*16;
    # dims (2,3,8): gram 2*8*8*6, proj 2*4*8*6.
    expected = 2 * 16 * 48 + 2 * 8 * 48 + 2 * 36 * 16 + 2 * 18 * 16 + 2 * 64 * 6 + 2 * 32 * 6
    assert sthosvd_flops((4, 6, 8), (2, 3, 4), (0, 1, 2)) == expected


# ---------------------------------------------------------------- invalid input


@pytest.mark.parametrize(
    "rank", [(0, 2, 2), (2, 0, 2), (2, 2, 0), (7, 2, 2), (2, 11, 2), (2, 2, 13), (2, 2), (2, 2, 2, 2), (-1, 2, 2)]
)
def test_invalid_ranks_raise(rank):
    x = torch.randn(6, 10, 12)
    with pytest.raises(ValueError):
        tucker(x, rank)
    with pytest.raises(ValueError):
        hosvd(x, rank)

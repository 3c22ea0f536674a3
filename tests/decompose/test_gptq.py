"""GPTQ's error feedback against a direct solve of each step's constrained least squares
(the Optimal Brain Quantizer with GPTQ's fixed column order), in float64."""

from __future__ import annotations

import pytest
import torch

from tuckerize.decompose.gptq import gptq, output_error, rtn
from tuckerize.quant_grid import Grid, codes, dequantize, fit


def _cov(n: int, seed: int, tokens: int = 200) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n, n, generator=g, dtype=torch.float64) * torch.logspace(0, -1.5, n, dtype=torch.float64)
    x = torch.randn(tokens, n, generator=g, dtype=torch.float64) @ mix
    return x.T @ x


def _ridged(C: torch.Tensor, damp: float) -> torch.Tensor:
    return C + damp * float(torch.diagonal(C).mean()) * torch.eye(C.shape[0], dtype=C.dtype)


def obq_reference(W: torch.Tensor, C: torch.Tensor, grid: Grid, damp: float, group_axis: str) -> torch.Tensor:
    """Column by column: quantise column j of the current weights, then set every column not
    yet quantised to ``argmin (x - w) C (x - w)^T`` with the quantised columns fixed
    (``x_F = w_F - C_FF^{-1} C_FD (q_D - w_D)``, solved directly)."""
    C = _ridged(C, damp)
    out, n = W.shape
    x = W.clone()
    Q = torch.zeros_like(W)
    g = min(grid.group, n if group_axis == "in" else out)
    s = z = None
    for j in range(n):
        if group_axis == "in":
            if j % g == 0:
                s, z = fit(x[:, j : j + g], grid)
            Q[:, j] = dequantize(codes(x[:, j : j + 1], s, z, grid), s, z)[:, 0]
        else:
            col = x[:, j].reshape(-1, g)
            sc, zc = fit(col, grid)
            Q[:, j] = dequantize(codes(col, sc, zc, grid), sc, zc).reshape(-1)
        D, F = list(range(j + 1)), list(range(j + 1, n))
        if F:
            delta = Q[:, D] - W[:, D]  # [out, |D|]
            x[:, F] = W[:, F] - torch.linalg.solve(C[F][:, F], C[F][:, D] @ delta.T).T
    return Q


@pytest.mark.parametrize("group_axis,bits,symmetric", [("in", 2, False), ("in", 3, False), ("out", 4, True)])
def test_gptq_equals_direct_obq_solve(group_axis, bits, symmetric):
    torch.manual_seed(0)
    out, n = 8, 24
    W = torch.randn(out, n, dtype=torch.float64)
    C = _cov(n, 1)
    grid = Grid(bits=bits, group=8 if group_axis == "in" else 4, symmetric=symmetric, clip=True)
    got = gptq(W, C, grid, group_axis=group_axis, damp=0.01, block=16)
    ref = obq_reference(W, C, grid, 0.01, group_axis)
    assert torch.linalg.norm(got.weight - ref) <= 1e-9 * torch.linalg.norm(ref)
    # the codes and scales reproduce the weight exactly
    if group_axis == "in":
        s = got.scale.repeat_interleave(grid.group, -1)
        z = got.zero.repeat_interleave(grid.group, -1)
    else:
        s = got.scale.repeat_interleave(grid.group, -1).T
        z = got.zero.repeat_interleave(grid.group, -1).T
    assert torch.equal((got.codes - z) * s, got.weight)
    assert got.codes.min() >= grid.qmin and got.codes.max() <= grid.qmax


def test_gptq_beats_round_to_nearest_and_batches():
    torch.manual_seed(2)
    E, out, n = 3, 16, 32
    W = torch.randn(E, out, n, dtype=torch.float64)
    C = torch.stack([_cov(n, 10 + e) for e in range(E)])
    grid = Grid(bits=3, group=16)
    batched = gptq(W, C, grid)
    for e in range(E):
        one = gptq(W[e], C[e], grid)
        assert torch.allclose(one.weight, batched.weight[e], atol=1e-12)
        # the error feedback lowers the output error of round to nearest on the same grids
        assert output_error(W[e], one.weight, C[e]) < 0.8 * output_error(W[e], rtn(W[e], grid).weight, C[e])
    shared = gptq(W, C[0], grid)  # one covariance for every matrix of the batch
    assert torch.allclose(shared.weight[1], gptq(W[1], C[0], grid).weight, atol=1e-12)


def test_expert_without_tokens_is_quantised_not_zeroed():
    W = torch.randn(2, 4, 8, dtype=torch.float64)
    C = torch.stack([_cov(8, 3), torch.zeros(8, 8, dtype=torch.float64)])
    q = gptq(W, C, Grid(bits=4, group=8))
    assert torch.isfinite(q.weight).all()
    assert torch.linalg.norm(q.weight[1] - W[1]) < 0.2 * torch.linalg.norm(W[1])

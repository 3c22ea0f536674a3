"""Estimated output errors of the stored forms of one projection, for a byte allocator.

All errors are squared, in one metric per projection: the tensor whitened on its input
mode, ``T x_n S`` (``S = C^{1/2}``, :mod:`tuckerize.decompose.whiten`; gate/up on H, down on I),
so ``||(T - T_hat) x_n S||^2`` is the calibration-set output error of ``T_hat``.

Tucker at ranks ``(E, r_H, r_I)`` (the per-expert cores free): :func:`energy_table` gives, for
every ``(r_H, r_I)`` at once, the energy that the higher-order SVD keeps (``T`` rotated onto the
eigenvectors of its mode-H and mode-I Gram matrices; the kept energy is the sum of squares of
the leading ``r_H x r_I`` block of every expert's rotated slice, a two-dimensional cumulative
sum), so the truncation error is ``total - table[r_H, r_I]``: an upper bound of what the
weighted ALS reaches. A quantised base ``Q`` leaves ``T - Q``; a Tucker residual of it at
``(r_H, r_I)`` removes ``energy_table(T - Q)[r_H, r_I]`` of that error.

Quantising the kept Tucker model adds noise: :func:`grid_noise` is the relative squared error
round to nearest makes on Gaussian values with a grid (a property of the grid alone,
computed once), charged on the kept energy. Pure tensor maths; sums and eigensolves in
float64, products in the tensor's dtype.
"""

from __future__ import annotations

import functools

import torch

from tuckerize.quant_grid import Grid, fake_quantize


def energy_table(Tw: torch.Tensor, max_ranks: tuple[int, int] | None = None) -> torch.Tensor:
    """``[a_max + 1, b_max + 1]``: entry ``[a, b]`` is the energy of ``Tw [E, H, I]`` kept by its
    HOSVD at ranks ``(E, a, b)`` (``[0, :]`` and ``[:, 0]`` are 0), for ranks up to ``max_ranks``
    (default ``(H, I)``; smaller maxima cost proportionally less: only the leading
    eigenvectors rotate the tensor)."""
    T = Tw if Tw.dtype in (torch.float32, torch.float64) else Tw.float()
    E, H, I = T.shape
    a_max, b_max = max_ranks if max_ranks is not None else (H, I)
    a_max, b_max = min(a_max, H), min(b_max, I)
    GH = torch.einsum("ehi,egi->hg", T, T).double()  # Grams in the tensor's dtype, eigensolves in float64
    GI = torch.einsum("ehi,ehj->ij", T, T).double()
    VH = torch.linalg.eigh(0.5 * (GH + GH.T))[1].flip(1)[:, :a_max].to(T.dtype)  # descending eigenvalues
    VI = torch.linalg.eigh(0.5 * (GI + GI.T))[1].flip(1)[:, :b_max].to(T.dtype)
    R = torch.matmul(VH.T, torch.matmul(T, VI))  # [E, a_max, b_max]
    sq = (R.double() ** 2).sum(0)
    out = torch.zeros(a_max + 1, b_max + 1, dtype=torch.float64, device=T.device)
    out[1:, 1:] = sq.cumsum(0).cumsum(1)
    return out.cpu()


@functools.lru_cache(maxsize=64)
def grid_noise(grid: Grid) -> float:
    """Relative squared error of round to nearest on ``grid`` for Gaussian values."""
    x = torch.randn(512, 256, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    d = fake_quantize(x, grid) - x
    return float((d * d).sum() / (x * x).sum())


__all__ = ["energy_table", "grid_noise"]

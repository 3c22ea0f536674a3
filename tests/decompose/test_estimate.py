"""Error estimates of the byte allocator (tuckerize.decompose.estimate) against explicit float64 maths."""

from __future__ import annotations

import torch

from tuckerize.decompose.estimate import energy_table, grid_noise
from tuckerize.quant_grid import Grid


def test_energy_table_is_the_hosvd_kept_energy():
    g = torch.Generator().manual_seed(0)
    T = torch.randn(5, 9, 7, generator=g, dtype=torch.float64)
    table = energy_table(T)
    part = energy_table(T, (4, 3))
    GH = torch.einsum("ehi,egi->hg", T, T)
    GI = torch.einsum("ehi,ehj->ij", T, T)
    VH = torch.linalg.eigh(GH)[1].flip(1)
    VI = torch.linalg.eigh(GI)[1].flip(1)
    for a, b in [(1, 1), (3, 2), (9, 7), (4, 3), (9, 1)]:
        P_H, P_I = VH[:, :a] @ VH[:, :a].T, VI[:, :b] @ VI[:, :b].T
        approx = P_H @ T @ P_I  # HOSVD at (E, a, b): projections on the leading eigenvectors
        err = float(((T - approx) ** 2).sum())
        assert abs(float(table[a, b]) - (float((T * T).sum()) - err)) < 1e-9 * float((T * T).sum())
        if a <= 4 and b <= 3:
            assert abs(float(part[a, b]) - float(table[a, b])) < 1e-9 * float((T * T).sum())
    assert float(table[0, 3]) == 0.0 and part.shape == (5, 4)


def test_grid_noise_falls_with_bits():
    noise = [grid_noise(Grid(bits=b, group=64)) for b in (1, 2, 3, 4, 8)]
    assert all(a > b for a, b in zip(noise, noise[1:]))
    assert 1e-5 < noise[-1] < 1e-3 < noise[0] < 1

"""tuckerize.decompose.refit: the per-expert solves against numpy's dense solves of the
normal equations (Kronecker form for the two-sided gate/up problem)."""

from __future__ import annotations

import numpy as np
import torch

from tuckerize.decompose.refit import refit_cores

E, H, I, rH, rI = 3, 10, 8, 4, 5
DAMP = 0.05


def _factors(g: torch.Generator) -> dict[str, torch.Tensor]:
    q = lambda n, r: torch.linalg.qr(torch.randn(n, r, generator=g))[0]  # noqa: E731
    return {"U_E": torch.eye(E), "U_H": q(H, rH), "U_I": q(I, rI), "core": torch.randn(E, rH, rI, generator=g)}


def test_refit_cores_solve_the_two_sided_problem():
    """gate/up with and without output-side weights: (A_e (x) Q_e^T + lam) vec(G) = vec(rhs + lam G0)."""
    g = torch.Generator().manual_seed(0)
    factors = _factors(g)
    z = torch.randn(E, 30, rH, generator=g, dtype=torch.float64)
    A = z.transpose(1, 2) @ z
    B = torch.randn(E, rH, I, generator=g, dtype=torch.float64)
    m = torch.randn(E, I, I, generator=g, dtype=torch.float64)
    Bw = m @ m.transpose(1, 2) + torch.eye(I, dtype=torch.float64)
    for W in (Bw, None):
        got = refit_cores(A, B, factors, DAMP, W)
        assert got.shape == (E, rH, rI) and got.dtype == torch.float32
        U_I = factors["U_I"].double().numpy()
        for e in range(E):
            Ae = A[e].numpy()
            Bm = np.eye(I) if W is None else W[e].numpy()
            Q = U_I.T @ Bm @ U_I
            lam = DAMP * np.trace(Ae) / rH * np.trace(Q) / rI
            G0 = factors["core"][e].double().numpy()
            rhs = B[e].numpy() @ Bm @ U_I + lam * G0
            K = np.kron(Ae, Q.T) + lam * np.eye(rH * rI)  # row-major vec: vec(A G Q) = (A (x) Q^T) vec(G)
            ref = np.linalg.solve(K, rhs.reshape(-1)).reshape(rH, rI)
            assert np.linalg.norm(got[e].double().numpy() - ref) / np.linalg.norm(ref) < 1e-5, (W is None, e)


def test_refit_cores_down_and_experts_without_tokens():
    """down: G (A_e + lam) = B_e + lam G0; an expert with no tokens (A_e = 0) keeps its core;
    a non-identity U_E is undone (the result is U_E^T G)."""
    g = torch.Generator().manual_seed(1)
    factors = _factors(g)
    factors["U_E"] = torch.linalg.qr(torch.randn(E, E, generator=g))[0]
    z = torch.randn(E, 20, rI, generator=g, dtype=torch.float64)
    A = z.transpose(1, 2) @ z
    A[1] = 0.0
    B = torch.randn(E, rH, rI, generator=g, dtype=torch.float64)
    got = refit_cores(A, B, factors, DAMP, down=True)
    G = np.einsum("ea,abc->ebc", factors["U_E"].double().numpy(), got.double().numpy())
    G0 = np.einsum("ea,abc->ebc", factors["U_E"].double().numpy(), factors["core"].double().numpy())
    for e in (0, 2):
        Ae = A[e].numpy()
        lam = DAMP * np.trace(Ae) / rI
        ref = np.linalg.solve((Ae + lam * np.eye(rI)).T, (B[e].numpy() + lam * G0[e]).T).T
        assert np.linalg.norm(G[e] - ref) / np.linalg.norm(ref) < 1e-5, e
    assert np.linalg.norm(G[1] - G0[1]) / np.linalg.norm(G0[1]) < 1e-6

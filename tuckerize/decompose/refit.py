"""Per-expert core refit (``method.refit``): each expert's Tucker core re-solved on its own data.

Given a projection's shared factors ``U_E`` [E, E] (square: r_E = E), ``U_H`` [H, r_H],
``U_I`` [I, r_I] and core [E, r_H, r_I], expert e's own core ``G_e = (U_E core)_e``
[r_H, r_I] is refitted to the statistics its routed calibration tokens give (accumulated by
:class:`tuckerize.calibration.collect.RefitCollector`):

gate/up: ``A_e`` [r_H, r_H] and ``B_e`` [r_H, I] (``Z = X_e U_H``: ``A_e = Z^T D Z``,
``B_e = Z^T D X_e W_e``, ``D = diag(w^2)``); the core minimising the weighted output error
``tr(dW_e^T C_xe dW_e W_out,e)`` (``W_out,e`` [I, I]: the output-side weight of
``--whitening expert``, identity otherwise) solves the Sylvester equation
``A_e G Q_e = B_e W_out,e U_I`` with ``Q_e = U_I^T W_out,e U_I`` [r_I, r_I].
down: ``A_e`` [r_I, r_I], ``B_e`` [r_H, r_I] (``z = U_I^T a``, ``y = U_H^T W_e a``:
``A_e = sum w^2 z z^T``, ``B_e = sum w^2 y z^T``) and ``G A_e = B_e``.

Each solve is shrunk towards the current core ``G0_e`` (``+ lam ||G - G0_e||^2``, ``lam =
damp * mean eig A_e (* mean eig Q_e)``), so an expert with few or no tokens keeps (nearly)
its current core. Pure tensor maths in float64.
"""

from __future__ import annotations

from typing import Mapping

import torch


def refit_cores(A: torch.Tensor, B: torch.Tensor, factors: Mapping[str, torch.Tensor], damp: float,
                output_weight: torch.Tensor | None = None, down: bool = False) -> torch.Tensor:
    """The refitted core ``[E, r_H, r_I]`` (float32) of one projection (module docstring).

    ``A`` [E, r_H, r_H] (gate/up) or [E, r_I, r_I] (``down=True``); ``B`` [E, r_H, I]
    (gate/up) or [E, r_H, r_I] (down); ``factors``: ``U_E`` [E, E], ``U_H`` [H, r_H],
    ``U_I`` [I, r_I], ``core`` [E, r_H, r_I]; ``output_weight`` [E, I, I] (gate/up only;
    None: identity). Returns ``U_E^T G`` so that ``U_E core`` gives the refitted G."""
    f = {k: v.double() for k, v in factors.items()}
    G0 = torch.einsum("ea,abc->ebc", f["U_E"], f["core"])
    G = G0.clone()
    for e in range(A.shape[0]):
        Ae = A[e]
        lam = damp * float(torch.diagonal(Ae).mean())
        if not lam > 0:
            continue
        if down:  # G (A + lam) = B + lam G0
            reg = Ae + lam * torch.eye(Ae.shape[0], dtype=torch.float64, device=Ae.device)
            G[e] = torch.linalg.solve(reg, (B[e] + lam * G0[e]).T).T
            continue
        U_I = f["U_I"]
        if output_weight is None:
            Q = torch.eye(U_I.shape[1], dtype=torch.float64, device=Ae.device)
            rhs = B[e] @ U_I
        else:
            BU = output_weight[e].to(Ae.device, torch.float64) @ U_I
            Q = U_I.T @ BU
            rhs = B[e] @ BU
        lam *= float(torch.diagonal(Q).mean())
        # A G Q + lam G = rhs + lam G0, diagonalised by the eigenvectors of A and Q
        a, Va = torch.linalg.eigh(Ae)
        q, Vq = torch.linalg.eigh(0.5 * (Q + Q.T))
        G[e] = Va @ ((Va.T @ (rhs + lam * G0[e]) @ Vq) / (a[:, None] * q[None, :] + lam)) @ Vq.T
    return torch.einsum("ea,ebc->abc", f["U_E"], G).float()


__all__ = ["refit_cores"]

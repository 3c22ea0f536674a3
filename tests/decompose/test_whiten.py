"""tuckerize.decompose.whiten: whitened Tucker against its definition."""

from __future__ import annotations

import pytest
import torch
from calibration_common import rel

from tuckerize.decompose import tucker
from tuckerize.decompose.whiten import whiten, whitened_tucker, whitening


def test_whitened_tucker_properties():
    g = torch.Generator().manual_seed(0)
    E, H, I = 6, 20, 12
    x = torch.randn(E, H, I, generator=g)
    a = torch.randn(H, H, generator=g) * torch.logspace(0, -3, H)  # anisotropic inputs
    cov = (a @ a.T).double()
    w = [None, whitening(cov, 1e-6), None]
    rank = (6, 8, 12)
    res = whitened_tucker(x, rank, w)
    # orthonormal factors, reconstruction in the original space
    for f in res.factors:
        assert torch.allclose(f.T.double() @ f.double(), torch.eye(f.shape[1], dtype=torch.float64), atol=1e-5)
    dense = res.to_tensor()
    assert res.relative_error == pytest.approx(rel(dense, x), rel=1e-4)
    # the whitened error is the output error ||S dW|| / ||S W||, and beats plain Tucker's
    xs, ds = whiten(x.double(), [None, w[1], None]), whiten(dense.double(), [None, w[1], None])
    assert res.whitened_error == pytest.approx(rel(ds, xs), rel=1e-3)
    plain = tucker(x, rank).to_tensor()
    assert rel(whiten(plain.double(), [None, w[1], None]), xs) > 1.5 * res.whitened_error
    # identity weights are plain Tucker
    eye = whitening(torch.eye(H, dtype=torch.float64), 0.0)
    same = whitened_tucker(x, rank, [None, eye, None])
    assert rel(same.to_tensor(), plain) < 1e-4

"""The stored forms of --bytes (tuckerize.compress.forms): candidates' bytes are exactly what
is written, estimates rank the forms as their measured errors do, and every form reads back."""

from __future__ import annotations

import pytest
import torch

from tuckerize.allocate_bytes import Option
from tuckerize.calibration.weights import WhitenOptions, mode_weights
from tuckerize.compress.forms import BytesMethod, projection_options, realise
from tuckerize.decompose.expert_weighted import expert_weighted_tucker
from tuckerize.quant import decode


def _layer(E=4, H=32, I=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    T = torch.randn(E, H, I, generator=g) + torch.einsum("ha,ai->hi", torch.randn(H, 3, generator=g),
                                                         torch.randn(3, I, generator=g))[None]
    x = torch.randn(300, H, generator=g, dtype=torch.float64)
    a = torch.randn(E, 200, I, generator=g, dtype=torch.float64)
    stats = {"hidden_routed": x.T @ x, "hidden": x.T @ x, "inter_expert": torch.einsum("eti,etj->eij", a, a)}
    stats["inter_routed"] = stats["inter"] = stats["inter_expert"].sum(0)
    return T, stats


def _weights(stats, proj):
    from tuckerize.decompose.expert_weighted import ridge

    if proj == "down":
        return None, ridge(stats["inter_expert"], 0.1)
    return ridge(stats["hidden_routed"], 0.1), ridge(torch.eye(16, dtype=torch.float64).expand(4, 16, 16), 0.1)


@pytest.mark.parametrize("proj", ["gate", "down"])
def test_every_form_writes_its_counted_bytes_and_reads_back(proj):
    T, stats = _layer()
    A, B = _weights(stats, proj)
    method = BytesMethod(base_bits=(2, 3), base_groups=(8, 16), rank_steps=4)
    opts = projection_options(T, stats, proj, method, mode_weights(stats, proj, WhitenOptions(method="pooled")))
    forms = {o.form for o in opts}
    assert forms == {"tucker", "base", "base+tucker"}
    names = {f: f"x.{proj}.{f}" for f in ("U_E", "U_H", "U_I", "core")}
    picks = [min((o for o in opts if o.form == f), key=lambda o: o.bytes) for f in sorted(forms)]
    picks.append(max((o for o in opts if o.form == "base+tucker"), key=lambda o: o.bytes))
    for opt in picks:
        tensors, record = realise(T, opt, proj=proj, layer_stats=stats, A=A, B=B,
                                  decompose_tucker=lambda t, r: expert_weighted_tucker(t, r, A, B),
                                  names=names, base_name=f"x.{proj}.base", method=method)
        assert record["bytes"] == opt.bytes, opt  # exactly what the allocator counted
        recon = 0
        if opt.base is not None:
            b = decode(tensors, f"x.{proj}.base").double()
            recon = b if proj == "down" else b.transpose(1, 2)
        if opt.ranks is not None:
            f = {k: decode(tensors, n).double() for k, n in names.items()}
            recon = recon + torch.einsum("ea,abc,hb,ic->ehi", f["U_E"], f["core"], f["U_H"], f["U_I"])
        rel = float(torch.linalg.norm(T.double() - recon) / torch.linalg.norm(T.double()))
        assert rel == pytest.approx(record["relative_error"], rel=1e-4)


def test_estimates_order_the_measured_errors():
    """More bits, finer groups and larger residuals: lower estimated error, as measured."""
    T, stats = _layer(seed=1)
    method = BytesMethod(forms=("base",), base_bits=(2, 3, 4), base_groups=(16,))
    opts = projection_options(T, stats, "gate", method, mode_weights(stats, "gate", WhitenOptions(method="pooled")))
    errs = [o.error for o in sorted(opts, key=lambda o: o.base)]
    assert errs[0] > errs[1] > errs[2] > 0
    method = BytesMethod(forms=("base+tucker",), base_bits=(2,), base_groups=(16,), rank_steps=4, residual_max=1.0)
    opts = projection_options(T, stats, "gate", method, mode_weights(stats, "gate", WhitenOptions(method="pooled")))
    by_rank = {o.ranks[1:]: o.error for o in opts}
    assert by_rank[(32, 16)] < by_rank[(16, 8)] < by_rank[(8, 4)]


def test_option_description():
    o = Option("base+tucker", 10, 0.1, ranks=(4, 8, 8), base=(2, 128), storage="int4")
    assert o.describe() == "int2 g128 base + Tucker 4,8,8 int4"

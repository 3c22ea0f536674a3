"""tuckerize.calibration.weights: the pooled and per-expert weightings reduce every layer's output
error; fold-back of the written factors; per-expert hidden covariances."""

from __future__ import annotations

import pytest
import torch
import tucker_refs
from calibration_common import DEMO, POOLED, SAMPLES, SEQLEN, UNIFORM, rel
from moe_errors import moe_output_errors

from tuckerize.calibration.store import CalibrationStats
from tuckerize.calibration.weights import WhitenOptions
from tuckerize.compress import decompose_checkpoint
from tuckerize.decompose import tucker
from tuckerize.decompose.whiten import whitening
from tuckerize.format import TuckerCheckpoint


def test_whitening_reduces_output_error_of_every_moe_layer(demo_runs):
    """Both weightings beat plain Tucker on every layer's calibration output error, and the
    per-expert one (the default) beats the pooled one."""
    plain, pooled, white = moe_output_errors(DEMO, [demo_runs["plain"], demo_runs["pooled"], demo_runs["white"]],
                                             demo_runs["tokens"])
    assert set(plain) == set(white) == set(pooled) == {0, 1, 2, 3}
    for layer in plain:
        assert pooled[layer] < 0.97 * plain[layer], (layer, plain[layer], pooled[layer])
        assert white[layer] < 0.97 * pooled[layer], (layer, pooled[layer], white[layer])
    # and the weight-space error is larger: whitening trades weight error for output error
    for run in ("m_pooled", "m_white"):
        for tp, tw in zip(demo_runs["m_plain"]["tensors"], demo_runs[run]["tensors"]):
            assert tw["relative_error"] >= tp["relative_error"] - 1e-6
            assert tw["whitened_error"] < tw["relative_error"]


def test_fold_back_of_written_factors(demo_runs):
    """W from the saved (orthonormal) factors == S^{-1}-unwhitened Tucker of the whitened tensor."""
    from tuckerize.arch import moe_spec
    from tuckerize.checkpoint import Checkpoint, load_config
    from tuckerize.experts import stack_projection

    stats = CalibrationStats.load(demo_runs["white"])
    ckpt = TuckerCheckpoint.open(demo_runs["pooled"])
    src = Checkpoint.open(DEMO)
    spec = moe_spec(load_config(DEMO))
    damp = POOLED.damp
    for layer, proj in ((0, "gate"), (3, "down")):
        cov = stats.layers[layer]["hidden_routed" if proj != "down" else "inter_routed"]
        vals, vecs = torch.linalg.eigh(cov)
        vals = vals.clamp_min(0) + damp * vals.clamp_min(0).mean()
        S, S_inv = (vecs * vals.sqrt()) @ vecs.T, (vecs / vals.sqrt()) @ vecs.T
        mode = 1 if proj != "down" else 2
        W = stack_projection(src, spec, layer, proj)
        Wp = torch.movedim(torch.movedim(W.double(), mode, -1) @ S, -1, mode).float()  # W x_mode S
        t = tucker(Wp, UNIFORM)
        factors = [f.double() for f in t.factors]
        factors[mode] = S_inv @ factors[mode]
        expected = tucker_refs.dense_from_factors(*factors, t.core)
        f = ckpt.factors(layer, proj)
        got = tucker_refs.dense_from_factors(f["U_E"], f["U_H"], f["U_I"], f["core"])
        assert rel(got, expected) < 1e-3  # float32 whitening in the library, float64 here
        for name in ("U_E", "U_H", "U_I"):
            u = f[name].double()
            assert torch.allclose(u.T @ u, torch.eye(u.shape[1], dtype=torch.float64), atol=1e-5), name
        entry = next(x for x in demo_runs["m_pooled"]["tensors"] if x["layer"] == layer and x["projection"] == proj)
        assert entry["relative_error"] == pytest.approx(rel(got, W), rel=1e-4)


def test_expert_hidden_covariances(demo_runs, tmp_path):
    """--expert-hidden: statistics with each expert's own hidden covariance, used as the
    hidden-side weight; every layer's calibration output error still beats the pooled whitening."""
    out = tmp_path / "eh"
    m = decompose_checkpoint(str(DEMO), out, ranks=UNIFORM, calibration="demo", samples=SAMPLES, seqlen=SEQLEN,
                             per_expert_stats=True, whiten_options=WhitenOptions(expert_hidden=True))
    assert m["calibration"]["whitening"]["expert_hidden"] is True
    assert CalibrationStats.load(out).layers[0]["hidden_expert"].shape == (16, 128, 128)
    pooled, eh = moe_output_errors(DEMO, [demo_runs["pooled"], out], demo_runs["tokens"])
    for layer in pooled:
        assert eh[layer] < 0.97 * pooled[layer], (layer, pooled[layer], eh[layer])

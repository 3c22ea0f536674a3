"""--refit end to end: each expert's core refitted to its own routed calibration data."""

from __future__ import annotations

import pytest
import torch
import tucker_refs
from calibration_common import DEMO, POOLED, SAMPLES, SEQLEN, UNIFORM, rel
from moe_errors import moe_output_errors

from tuckerize.compress import decompose_checkpoint
from tuckerize.format import TuckerCheckpoint


def test_per_expert_core_refit_reduces_output_error_further(demo_runs, tmp_path):
    from tuckerize.arch import moe_spec
    from tuckerize.checkpoint import Checkpoint, load_config
    from tuckerize.experts import stack_projection

    out = tmp_path / "refit"
    m = decompose_checkpoint(str(DEMO), out, ranks=UNIFORM, calibration="demo", samples=SAMPLES, seqlen=SEQLEN,
                             stats=demo_runs["white"], refit=True, whiten_options=POOLED)
    assert m["calibration"]["refit"] is True and all(t["refit"] for t in m["tensors"])
    white, refit = moe_output_errors(DEMO, [demo_runs["pooled"], out], demo_runs["tokens"])
    for layer in white:
        assert refit[layer] < white[layer], (layer, white[layer], refit[layer])
    # same shared factors, other cores; the reported error is that of the written factors
    a, b = TuckerCheckpoint.open(demo_runs["pooled"]), TuckerCheckpoint.open(out)
    fa, fb = a.factors(2, "down"), b.factors(2, "down")
    assert torch.equal(fa["U_H"], fb["U_H"]) and torch.equal(fa["U_I"], fb["U_I"])
    assert not torch.equal(fa["core"], fb["core"])
    W = stack_projection(Checkpoint.open(DEMO), moe_spec(load_config(DEMO)), 2, "down")
    entry = next(x for x in m["tensors"] if x["layer"] == 2 and x["projection"] == "down")
    assert entry["relative_error"] == pytest.approx(rel(tucker_refs.dense_from_factors(*fb.values()), W), rel=1e-4)


def test_refit_with_per_expert_weighting(demo_runs, tmp_path):
    """--refit on top of the per-expert weighting (the default): gate/up cores refitted with
    each expert's own hidden covariance, down kept; every layer's output error falls."""
    out = tmp_path / "refit"
    m = decompose_checkpoint(str(DEMO), out, ranks=UNIFORM, calibration="demo", samples=SAMPLES, seqlen=SEQLEN,
                             stats=demo_runs["white"], refit=True)
    assert all(t["refit"] for t in m["tensors"] if t["projection"] != "down")
    assert all("refit" not in t for t in m["tensors"] if t["projection"] == "down")
    white, refit = moe_output_errors(DEMO, [demo_runs["white"], out], demo_runs["tokens"])
    for layer in white:
        assert refit[layer] < white[layer], (layer, white[layer], refit[layer])
    a, b = TuckerCheckpoint.open(demo_runs["white"]), TuckerCheckpoint.open(out)
    kept, refitted = (rel(b.factors(1, p)["core"], a.factors(1, p)["core"]) for p in ("down", "up"))
    # down is not refitted: it differs only because --refit decomposes from the layer's statistics in float64
    # (collected again as it runs the layer) and the first run from the file's (per-expert fields in float16)
    assert kept < 2e-3 and refitted > 2e-2, (kept, refitted)

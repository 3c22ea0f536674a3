"""Shared calibration fixture: plain, per-expert whitened and pooled-whitened Tucker of the demo model
at the same uniform ranks, plus the calibration tokens (built once for the package)."""

from __future__ import annotations

import pytest
from calibration_common import DEMO, POOLED, SAMPLES, SEQLEN, UNIFORM

from tuckerize.calibration.tokens import calibration_tokens
from tuckerize.compress import decompose_checkpoint
from tuckerize.text import read_text


@pytest.fixture(scope="package")
def demo_runs(tmp_path_factory):
    """Plain and whitened Tucker of the demo model at the same uniform ranks, plus the tokens."""
    root = tmp_path_factory.mktemp("cal")
    white = root / "white"
    m_white = decompose_checkpoint(str(DEMO), white, ranks=UNIFORM, calibration="demo", samples=SAMPLES, seqlen=SEQLEN)
    plain = root / "plain"
    m_plain = decompose_checkpoint(str(DEMO), plain, ranks=UNIFORM)
    pooled = root / "pooled"
    m_pooled = decompose_checkpoint(str(DEMO), pooled, ranks=UNIFORM, stats=white, whiten_options=POOLED)
    text, _ = read_text("demo")
    tokens = calibration_tokens(text, DEMO, SAMPLES, SEQLEN)
    return {"root": root, "white": white, "plain": plain, "pooled": pooled, "m_white": m_white, "m_plain": m_plain,
            "m_pooled": m_pooled, "tokens": tokens}

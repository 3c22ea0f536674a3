"""bench/outliers.py: the kurtosis it reports, against known distributions and a tiny model."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import outliers  # noqa: E402


def test_kurtosis_of_known_distributions():
    g = torch.Generator().manual_seed(0)
    assert outliers.kurtosis(torch.randn(200_000, generator=g)) == pytest.approx(3.0, abs=0.05)
    lap = torch.distributions.Laplace(0.0, 1.0).sample((200_000,))
    assert outliers.kurtosis(lap) == pytest.approx(6.0, abs=0.3)
    assert outliers.kurtosis(torch.tensor([-1.0, 1.0] * 50)) == pytest.approx(1.0)


def test_weight_stats_of_a_tiny_checkpoint(tiny_factory):
    stats = outliers.weight_stats(tiny_factory("qwen3_moe"))
    assert 1.0 <= stats["weight_kurtosis_mean"] <= stats["weight_kurtosis_max"]
    assert stats["weight_max_over_rms_mean"] > 1.0

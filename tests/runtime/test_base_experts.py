"""Experts stored as a packed quantised base and/or a shared Tucker residual
(tuckerize.runtime.base_experts) against an independent float64 dense MoE, on one process
and on two gloo processes."""

from __future__ import annotations

import pytest
import torch

from base_forms import FORMS, PREFIX, reference_moe, reference_weights, routing, stored_layer, tp_worker
from dist_helpers import run_workers
from tuckerize.errors import ShardError
from tuckerize.runtime.base_experts import BaseResidualExperts


def _rel(a, b):
    return float(torch.linalg.norm(a.double() - b.double()) / torch.linalg.norm(b.double()))


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-6), (torch.float32, 1e-5)])  # cores formed in float32
def test_single_process_matches_float64_reference(dtype, tol):
    stored = stored_layer()
    m = BaseResidualExperts(4, 16, 24, FORMS, dtype=dtype)
    m.load_tensors(stored, PREFIX)
    x = torch.randn(9, 16, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    index, weights = routing(9, 4, 2)
    ref = reference_moe(reference_weights(stored), x, index, weights)
    assert _rel(m(x.to(dtype), index, weights), ref) < tol
    # the packed base stays packed: codes are uint8, 2 or 3 bits per weight
    assert m.gate.base.codes.dtype == torch.uint8
    assert m.gate.base.codes.numel() == 4 * 24 * 16 * 2 // 8
    assert m.memory_bytes()["base"] < 3 * 4 * 16 * 24  # fewer bytes than int8 dense experts


def test_only_touched_experts_are_dequantised(monkeypatch):
    stored = stored_layer()
    m = BaseResidualExperts(4, 16, 24, FORMS, dtype=torch.float64)
    m.load_tensors(stored, PREFIX)
    seen = []
    original = type(m.gate.base).weight

    def spy(self, e, dtype):
        seen.append(e)
        return original(self, e, dtype)

    monkeypatch.setattr(type(m.gate.base), "weight", spy)
    x = torch.randn(3, 16, dtype=torch.float64)
    m(x, torch.tensor([[1, 2], [2, 1], [1, 2]]), torch.full((3, 2), 0.5))
    assert sorted(set(seen)) == [1, 2] and len(seen) == 2 * 3  # experts 1, 2; gate, up, down once each


@pytest.mark.parametrize("layout,experts", [("intermediate", None), ("expert", None), ("expert", [[3, 0], [1, 2]])])
def test_two_processes_match_single_process(tmp_path, layout, experts):
    run_workers(tp_worker, 2, (str(tmp_path), layout, experts), timeout=180)
    stored = stored_layer()
    x = torch.randn(9, 16, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    index, weights = routing(9, 4, 2)
    ref = reference_moe(reference_weights(stored), x, index, weights)
    for r in range(2):
        got = torch.load(tmp_path / f"{layout}-r{r}.pt")
        assert _rel(got["y"], ref) < 1e-6
    if layout == "intermediate":  # I = 24 is three of down's groups of 8: whole groups per rank
        inter = [torch.load(tmp_path / f"{layout}-r{r}.pt")["inter"] for r in range(2)]
        assert inter == [(0, 16), (16, 24)]


def test_refuses_hybrid_layouts_and_empty_projections():
    with pytest.raises(ShardError, match="hybrid"):
        BaseResidualExperts(4, 16, 24, FORMS, layout="hybrid")
    with pytest.raises(ShardError, match="neither"):
        BaseResidualExperts(4, 16, 24, {**FORMS, "up": {"ranks": None, "base": None}})

"""bench/moe_call.py's timing: each call's own time, the state set before it left out."""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture(scope="module")
def moe_call():
    sys.path.insert(0, str(BENCH))  # the bench imports its sibling runtime.py, as `python bench/moe_call.py` does
    try:
        spec = importlib.util.spec_from_file_location("bench_moe_call", BENCH / "moe_call.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(BENCH))
    return mod


def test_per_call_times_the_call_not_the_state(moe_call):
    """A 3 ms call measures about 3 ms in every state: the idle gap (2 ms) and the cache flush
    come before the clock starts; the flush writes its buffer each time."""
    flush = torch.zeros(1024)
    for state in moe_call.STATES:
        sec = moe_call.per_call(lambda: time.sleep(0.003), state, 5, flush)
        assert 0.003 <= sec < 0.0045, (state, sec)
    assert float(flush[0]) == 5.0  # the cold state's five flushes



def test_dense_onednn_baseline_equals_transformers_experts(moe_call):
    """The oneDNN baseline computes what transformers' dense experts compute (same weights,
    same routing; float32, relative norm)."""
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    from tuckerize.runtime.kernels.cpu_moe import onednn_dtype

    if not onednn_dtype(torch.float32):
        pytest.skip("no oneDNN in this torch build")
    E, H, I, K = 8, 64, moe_call.I, 2
    cfg = Qwen3MoeConfig(hidden_size=H, moe_intermediate_size=I, num_experts=E, num_experts_per_tok=K)
    cfg._experts_implementation = "eager"
    ref = Qwen3MoeExperts(cfg).requires_grad_(False)
    torch.manual_seed(0)
    ref.gate_up_proj.normal_(std=0.05)
    ref.down_proj.normal_(std=0.05)
    x = torch.randn(5, H)
    w, idx = torch.topk(torch.softmax(torch.randn(5, E), -1), K, dim=-1)
    want = ref(x, idx, w)
    got = moe_call.DenseOneDNN(ref)(x, idx, w)
    assert float((got - want).norm() / want.norm()) < 1e-5

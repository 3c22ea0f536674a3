"""The probes vLLM's ``apply_model`` runs on every rank (tuckerize.integrations.vllm.probes): the
MoE blocks they find and the timers the serving bench wraps around them, on plain torch modules
shaped like vLLM's (a real engine, every family and tensor-parallel rank: test_vllm_plugin.py and
test_families.py, through ``assert_moe_blocks_timed``)."""

from __future__ import annotations

import pickle
import time

import torch
from torch import nn

from tuckerize.integrations.vllm import probes


class Block(nn.Module):
    """A MoE block as every family names its parts: ``gate`` (router) and ``experts``; the
    experts hold a ``gate`` of their own (as the Tucker experts' gate projection does)."""

    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(8, 4)
        self.experts = nn.ModuleDict({"gate": nn.Linear(8, 8), "experts": nn.Linear(8, 8)})

    def forward(self, hidden_states):
        time.sleep(0.002 * hidden_states.reshape(-1, 8).shape[0])
        return self.experts["gate"](hidden_states)


def _model():
    model = nn.Module()
    model.layers = nn.ModuleList(nn.ModuleDict({"mlp": Block() if i != 1 else nn.Linear(8, 8),  # layer 1: dense MLP
                                                "self_attn": nn.ModuleDict({"gate": nn.Linear(8, 8)})})
                                 for i in range(3))
    return model


def test_moe_blocks_are_the_outermost_gate_and_experts():
    model = _model()
    assert probes.moe_block_names(model) == ["layers.0.mlp", "layers.2.mlp"]
    assert [m for _, m in probes.moe_blocks(model)] == [model.layers[0]["mlp"], model.layers[2]["mlp"]]


def test_moe_timers_record_each_call_by_tokens():
    """The timers leave the output unchanged and record one (tokens, seconds) per call; a second
    install wraps nothing; taking the record empties it."""
    model = _model()
    x1, x3 = torch.randn(1, 8), torch.randn(3, 8)
    want = model.layers[2]["mlp"](x3)
    assert probes.take_moe_times(model) == []  # nothing installed yet
    assert probes.install_moe_timers(model) == 2
    assert probes.install_moe_timers(model) == 0
    for i in (0, 2):
        model.layers[i]["mlp"](x1)
        got = model.layers[i]["mlp"](x3.reshape(1, 3, 8))  # [batch, seq, H]: its tokens count
    assert torch.equal(got.reshape(3, 8), want)
    calls = probes.take_moe_times(model)
    assert [n for n, _ in calls] == [1, 3, 1, 3] and probes.take_moe_times(model) == []
    assert all(s >= 0.002 * n for n, s in calls)


def test_probes_pickle_by_reference():
    """vLLM's workers receive the probes pickled: by reference to this importable module, which
    a function of a script's ``__main__`` could not be (``bench/serve.py`` at --tp 2)."""
    for fn in (probes.install_moe_timers, probes.take_moe_times, probes.moe_block_names, probes.kernels_used,
               probes.weight_bytes, probes.tensor_shapes, probes.linear_partitions):
        data = pickle.dumps(fn)
        assert b"tuckerize.integrations.vllm.probes" in data and pickle.loads(data) is fn

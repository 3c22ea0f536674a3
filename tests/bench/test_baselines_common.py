"""bench/baselines/common.py (what gptq.py and awq.py share): writing dequantised expert
weights back into a copy of the source checkpoint, and finding the expert Linears by name."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench" / "baselines"))
import common  # noqa: E402


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral"])
def test_write_dense_replaces_exactly_the_experts(tiny_factory, tmp_path, arch):
    from safetensors.torch import load_file

    from tuckerize.arch import moe_spec
    from tuckerize.checkpoint import load_config

    src = tiny_factory(arch)
    spec = moe_spec(load_config(src))
    before = load_file(str(src / "model.safetensors"))
    weights = {}
    for layer in spec.moe_layers:
        for e in range(spec.num_experts):
            for p in ("gate", "up", "down"):
                w = before[spec.arch.expert_name(layer, p, e)].float()
                weights[(layer, e, p)] = w * (1 + layer) - e  # distinct per matrix
    common.write_dense(src, tmp_path / "out", weights, "test", {"k": 1})
    after = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert set(after) == set(before)
    names = {spec.arch.expert_name(lay, p, e): (lay, e, p) for (lay, e, p) in weights}
    for k, t in after.items():
        assert t.dtype == before[k].dtype and t.shape == before[k].shape
        if k in names:
            ref = weights[names[k]]
            assert float((t.float() - ref).norm() / ref.norm()) < 1e-6
        else:
            assert torch.equal(t, before[k])
    assert json.loads((tmp_path / "out" / "config.json").read_text()) == json.loads((src / "config.json").read_text())
    assert json.loads((tmp_path / "out" / "test.json").read_text()) == {"k": 1}


def test_write_dense_refuses_a_partial_set(tiny_factory, tmp_path):
    src = tiny_factory("qwen3_moe")
    with pytest.raises(SystemExit, match="1 of"):
        common.write_dense(src, tmp_path / "out", {(0, 0, "gate"): torch.zeros(1)}, "test", {})
    assert not (tmp_path / "out").exists()


def test_expert_names_and_levels():
    m = common.EXPERT.search("model.layers.3.mlp.experts.12.down_proj")
    assert m and (m.group(1), m.group(2), common.PROJ[m.group(3)]) == ("3", "12", "down")
    m = common.EXPERT.search("model.layers.0.block_sparse_moe.experts.5.w3")
    assert m and common.PROJ[m.group(3)] == "up"
    assert common.EXPERT.search("model.layers.0.mlp.gate") is None
    w = torch.arange(32.0).reshape(2, 16) % 5  # 5 distinct values in every group of 8
    assert common.levels_per_group(w, 8) == 5
    config = type("C", (), {"hidden_size": 128, "moe_intermediate_size": 64})()
    assert common.group_sizes(config) == {"gate": 128, "up": 128, "down": 64}
    schemes = common.int_schemes(common.group_sizes(config))
    assert {s["weights"]["group_size"] for s in schemes.values()} == {128, 64}
    assert {s["weights"]["num_bits"] for s in schemes.values()} == {4}
    low = common.int_schemes(common.group_sizes(config, 32), bits=2)
    assert {(s["weights"]["num_bits"], s["weights"]["group_size"], s["weights"]["symmetric"]) for s in low.values()} \
        == {(2, 32, False)}
    import re

    for proj, names in (("gate", ("gate_proj", "w1")), ("down", ("down_proj", "w2"))):
        pattern = schemes[f"experts_{proj}"]["targets"][0][3:]
        assert all(re.match(pattern, f"model.layers.0.mlp.experts.3.{n}") for n in names)
        assert not re.match(pattern, "model.layers.0.mlp.experts.3.up_proj")

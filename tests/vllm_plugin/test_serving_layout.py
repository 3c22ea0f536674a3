"""The vLLM plugin's layout choice (fast: no vLLM needed): the same rule as ``tuckerize
shard``, the environment variable, vLLM's expert parallelism, and experts assigned by the
load saved with the checkpoint's calibration statistics."""

from __future__ import annotations

import pytest
import torch

from tuckerize.errors import InputError
from tuckerize.integrations.vllm.moe import LAYOUT_ENV, serving_layout
from tuckerize.parallel import LAYOUTS, assign_experts
from tuckerize.runtime.layout import choose_layout

E = 16


def tucker_config(ranks=(8, 48, 32), layers=2, hidden=128, inter=64):
    """A Tucker config.json as decompose writes it (only what the layout rule reads)."""
    from tuckerize.format import tucker_config as wrap

    base = {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "num_hidden_layers": layers,
            "num_experts": E, "num_experts_per_tok": 4, "hidden_size": hidden, "moe_intermediate_size": inter,
            "num_attention_heads": 4, "num_key_value_heads": 2}
    section = {"layers": {str(L): {p: {"ranks": list(ranks), "shape": [E, hidden, inter]} for p in ("gate", "up", "down")}
                          for L in range(layers)}}
    return wrap(base, section)


@pytest.mark.parametrize("ranks,tp", [((8, 48, 32), 2), ((16, 96, 64), 4), ((4, 16, 8), 2)])
def test_auto_is_the_shard_writers_choice(ranks, tp, monkeypatch):
    monkeypatch.delenv(LAYOUT_ENV, raising=False)
    config = tucker_config(ranks)
    plan = serving_layout(config, tp)
    assert plan.layout == choose_layout(config, tp)[0]
    assert set(plan.costs) == {*LAYOUTS, "dense"}
    assert serving_layout(config, 1).layout == "intermediate"


def test_environment_and_expert_parallelism(monkeypatch):
    config = tucker_config()
    for layout in LAYOUTS:
        monkeypatch.setenv(LAYOUT_ENV, layout)
        plan = serving_layout(config, 2)
        assert plan.layout == layout and f"{LAYOUT_ENV}={layout}" in plan.describe(2)
    monkeypatch.setenv(LAYOUT_ENV, "rows")
    with pytest.raises(InputError) as err:
        serving_layout(config, 2)
    assert "\n" not in str(err.value) and "rows" in str(err.value) and "hybrid" in str(err.value)
    monkeypatch.delenv(LAYOUT_ENV)
    assert serving_layout(config, 2, expert_parallel=True).layout == "expert"
    with pytest.raises(InputError, match="data-parallel"):
        serving_layout(config, 2, expert_parallel=True, data_parallel=2)
    with pytest.raises(InputError, match="drop one of the two"):
        serving_layout(config, 2, expert_parallel=True, requested="hybrid")


def test_experts_assigned_by_the_saved_load(tmp_path, monkeypatch):
    """Uneven routing in the saved statistics: the plan assigns experts as the shard writer
    does; an even one, or no statistics, keeps the contiguous split."""
    from safetensors.torch import save_file

    monkeypatch.setenv(LAYOUT_ENV, "expert")
    config = tucker_config()
    counts = {0: [50.0] * 3 + [1.0] * (E - 3), 1: [10.0] * E}
    save_file({f"layers.{L}.expert_count": torch.tensor(c, dtype=torch.float64) for L, c in counts.items()},
              str(tmp_path / "calibration_stats.safetensors"))
    plan = serving_layout(config, 2, folder=tmp_path)
    want = assign_experts(counts, 2)
    assert want[0]["assigned"] and not want[1]["assigned"]
    assert [plan.experts(0, r) for r in range(2)] == want[0]["ranks"]
    assert sorted(plan.experts(0, 0) + plan.experts(0, 1)) == list(range(E))
    assert plan.experts(1, 0) is None and plan.experts(1, 1) is None  # contiguous
    assert "by measured load in 1 layers" in plan.describe(2)
    empty = tmp_path / "none"
    empty.mkdir()
    assert serving_layout(config, 2, folder=empty).assignment == {}
    monkeypatch.setenv(LAYOUT_ENV, "intermediate")  # nothing to assign when experts are not split
    assert serving_layout(config, 2, folder=tmp_path).assignment == {}

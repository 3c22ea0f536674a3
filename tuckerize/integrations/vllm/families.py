"""The MoE blocks of the families with shared experts and grouped routing, for vLLM.

:class:`~tuckerize.integrations.vllm.moe.TuckerMoE` serves Qwen3-MoE, Mixtral and OLMoE
(router + routed experts). The blocks here extend it for the families whose vLLM block
holds more (:mod:`.models` rebinds the block name of each vLLM model file to them):

- :class:`QwenSharedTuckerMoE` for Qwen2-MoE and Qwen3-Next (``Qwen2MoeSparseMoeBlock``,
  ``Qwen3NextSparseMoeBlock``): the shared expert ``shared_expert`` times
  ``sigmoid(shared_expert_gate(x))``;
- :class:`DeepseekTuckerMoE` for DeepSeek-V2 and V3 (``DeepseekV2MoE``): the ungated
  ``shared_experts`` (``moe_intermediate_size * n_shared_experts``) and grouped top-k
  routing (V3: sigmoid scores, ``e_score_correction_bias`` steering the choice only,
  ``noaux_tc``; V2: softmax scores, group-limited greedy), ``routed_scaling_factor``.

Only the routed experts are Tucker (:class:`~tuckerize.runtime.tucker_experts.TuckerExperts`,
laid out as the plan says). The router gate, the shared expert, its gate, and everything
around the block (MLA, gated delta-net, the dense first layers) are vLLM's own layers, built
with vLLM's quant_config and prefixes: their weights load through vLLM's loader, tensor
parallelism splits them as vLLM does, and an FP8 source keeps vLLM's FP8 layers there.

Routing is vLLM's: the gate is vLLM's ``GateLinear`` (router logits in the dtype vLLM computes
them in), and the selection from the logits is :func:`tuckerize.runtime.routing.select_experts`
with the :class:`RouterSpec` that says what vLLM's FusedMoE is told by the same config
(:func:`qwen_router`, :func:`deepseek_router`; README "Serving with vLLM" lists where that
differs from transformers).

Forward, one collective per block as in the native runtime (:mod:`tuckerize.runtime.moe`):
this rank's partial ``s`` of the Tucker experts (r_H values per token) and the shared
expert's row-parallel partial (H values, ``reduce_results=False``) go through one all-reduce
in one buffer; then ``s U_H,down^T`` (:meth:`TuckerExperts.finish`) plus the shared output.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from tuckerize.arch import FACTORS, PROJECTIONS
from tuckerize.errors import UnsupportedArchitectureError
from tuckerize.integrations.vllm.moe import TuckerMoE
from tuckerize.quant import SUFFIXES
from tuckerize.runtime.routing import RouterSpec, select_experts


def qwen_router(config: Any, num_experts: int, top_k: int) -> RouterSpec:
    """Softmax top-k, renormalised when ``norm_topk_prob`` (vLLM: ``renormalize=
    config.norm_topk_prob``; Qwen3-Next's default True, Qwen2-MoE's False, as transformers)."""
    return RouterSpec(kind="softmax_topk", num_experts=num_experts, top_k=top_k,
                      norm_topk_prob=bool(getattr(config, "norm_topk_prob", False)))


def deepseek_router(config: Any, num_experts: int, top_k: int) -> tuple[RouterSpec, bool]:
    """``(spec, renormalise_v2)`` as vLLM's DeepseekV2MoE reads the config: grouped top-k
    always (``n_group``/``topk_group``, 1 when unset), ``scoring_func`` (default softmax), the
    correction bias only for ``topk_method: noaux_tc``, ``renormalize=norm_topk_prob``,
    ``routed_scaling_factor``. tuckerize's ``deepseek_v3`` router is that for sigmoid + noaux_tc;
    its ``deepseek_v2`` router (group-limited greedy) is that for softmax without a bias, except
    that it never renormalises: ``renormalise_v2`` says the block must."""
    scoring = getattr(config, "scoring_func", None) or "softmax"
    method = getattr(config, "topk_method", None)
    n_group, topk_group = int(getattr(config, "n_group", None) or 1), int(getattr(config, "topk_group", None) or 1)
    norm = bool(getattr(config, "norm_topk_prob", False))
    common = dict(num_experts=num_experts, top_k=top_k, routed_scaling_factor=float(
        getattr(config, "routed_scaling_factor", None) or 1.0), n_group=n_group, topk_group=topk_group)
    if scoring == "sigmoid" and method == "noaux_tc":
        return RouterSpec(kind="deepseek_v3", norm_topk_prob=norm, topk_method=method, **common), False
    if scoring == "softmax" and method != "noaux_tc":
        # vLLM limits groups whatever topk_method says (with n_group 1 that is plain top-k).
        return RouterSpec(kind="deepseek_v2", topk_method="group_limited_greedy", **common), norm
    raise UnsupportedArchitectureError(
        f"DeepSeek routing with scoring_func {scoring} and topk_method {method} is not served by tuckerize's vLLM "
        "plugin; the releases use sigmoid with noaux_tc (V3) or softmax with greedy / group_limited_greedy (V2)")


class _SharedTuckerMoE(TuckerMoE):
    """Routed Tucker experts + vLLM's own gate and shared expert, one all-reduce per block."""

    def __init__(self, *args: Any, prefix: str = "", **kwargs: Any):
        super().__init__(*args, prefix=prefix, **kwargs)
        from vllm.config import get_current_vllm_config

        vllm_config = get_current_vllm_config()
        if getattr(vllm_config.parallel_config, "use_sequence_parallel_moe", False):
            raise UnsupportedArchitectureError(
                "tuckerize's vLLM plugin computes the Tucker experts on replicated activations; "
                "drop --use-sequence-parallel-moe")
        #: vLLM's fused-shared-expert bookkeeping (ROCm AITER) asks every MoE block.
        self.is_fused_shared_expert_enabled = False
        self.shared: nn.Module | None = None
        self.build(vllm_config.model_config.hf_text_config, vllm_config.quant_config, prefix)

    def build(self, config: Any, quant_config: Any, prefix: str) -> None:
        """The family's gate (replacing TuckerMoE's), router spec and shared expert."""
        raise NotImplementedError

    def select(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, _ = self.gate(x)
        return select_experts(logits, self.router)

    def forward_impl(self, x: torch.Tensor) -> torch.Tensor:
        """[T, H] -> [T, H]: route, this rank's partials of the Tucker experts and of the
        shared expert in one all-reduce, ``s U_H,d^T`` plus the shared output."""
        top_w, top_i = self.select(x)
        s = self.experts.partial(x, top_i, top_w)
        parallel = self.experts.parallel
        if self.shared is None:
            return self.experts.finish(parallel.all_reduce(s)).to(x.dtype)
        sh = self.shared_output(x)
        buf = parallel.all_reduce(torch.cat([s, sh.to(s.dtype)], dim=-1))
        s, sh = buf.split([s.shape[-1], sh.shape[-1]], dim=-1)
        return (self.experts.finish(s) + sh).to(x.dtype)

    def shared_output(self, x: torch.Tensor) -> torch.Tensor:
        return self.shared(x)


class QwenSharedTuckerMoE(_SharedTuckerMoE):
    """Qwen2-MoE / Qwen3-Next: vLLM's ``Qwen2MoeMLP`` shared expert (``reduce_results=False``),
    gated by ``sigmoid(shared_expert_gate(x))`` inside it, as vLLM builds it."""

    def build(self, config: Any, quant_config: Any, prefix: str) -> None:
        from vllm.model_executor.layers.fused_moe import GateLinear
        from vllm.model_executor.layers.linear import ReplicatedLinear
        from vllm.model_executor.models.qwen2_moe import Qwen2MoeMLP

        H, E = config.hidden_size, self.router.num_experts
        self.gate = GateLinear(H, E, prefix=f"{prefix}.gate")
        self.router = qwen_router(config, E, self.router.top_k)
        self.shared_expert_gate = ReplicatedLinear(H, 1, bias=False, quant_config=None,
                                                   prefix=f"{prefix}.shared_expert_gate")
        if int(getattr(config, "shared_expert_intermediate_size", 0) or 0) > 0:
            self.shared_expert = Qwen2MoeMLP(
                hidden_size=H, intermediate_size=config.shared_expert_intermediate_size,
                hidden_act=config.hidden_act, quant_config=quant_config, reduce_results=False,
                expert_gate=self.shared_expert_gate, prefix=f"{prefix}.shared_expert")
            self.shared = self.shared_expert


class DeepseekTuckerMoE(_SharedTuckerMoE):
    """DeepSeek-V2 / V3: vLLM's ``DeepseekV2MLP`` shared experts (``reduce_results=False``),
    grouped top-k routing with the correction bias under ``noaux_tc``, and vLLM's FP16
    overflow guard (in float16 the routed output is left unscaled and the shared output
    divided by ``routed_scaling_factor``; the decoder layer compensates)."""

    def build(self, config: Any, quant_config: Any, prefix: str) -> None:
        from vllm.model_executor.layers.fused_moe import GateLinear
        from vllm.model_executor.models.deepseek_v2 import DeepseekV2MLP

        H, E = config.hidden_size, self.router.num_experts
        if self.router.kind == "deepseek_v3" and getattr(config, "topk_method", None) != "noaux_tc":
            raise UnsupportedArchitectureError(
                "this DeepSeek-V3 config.json has no `topk_method: noaux_tc` / `scoring_func: sigmoid` (the "
                "releases have both; transformers' DeepseekV3Config does not save them): add them to config.json")
        self.router, self.renormalise = deepseek_router(config, E, self.router.top_k)
        router_dtype = torch.float32 if getattr(config, "moe_router_dtype", None) == "float32" else None
        self.gate = GateLinear(H, E, out_dtype=router_dtype, prefix=f"{prefix}.gate")
        self.gate.e_score_correction_bias = None
        if self.router.kind == "deepseek_v3":
            self.gate.e_score_correction_bias = nn.Parameter(torch.empty(E, dtype=torch.float32), requires_grad=False)
        _warn_cpu_rotary(config)
        self.n_shared_experts = int(getattr(config, "n_shared_experts", None) or 0)
        if self.n_shared_experts > 0:
            self.shared_experts = DeepseekV2MLP(
                hidden_size=H, intermediate_size=config.moe_intermediate_size * self.n_shared_experts,
                hidden_act=config.hidden_act, quant_config=quant_config, reduce_results=False,
                prefix=f"{prefix}.shared_experts")
            self.shared = self.shared_experts

    def _fp16_guard(self, x: torch.Tensor) -> bool:
        return x.dtype == torch.float16 and self.shared is not None and self.router.routed_scaling_factor != 1.0

    def select(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, _ = self.gate(x)
        top_w, top_i = select_experts(logits, self.router, self.gate.e_score_correction_bias)
        scale = self.router.routed_scaling_factor
        if self.renormalise:  # the deepseek_v2 router scaled without renormalising
            top_w = top_w / top_w.sum(dim=-1, keepdim=True) * scale
        if self._fp16_guard(x):
            top_w = top_w / scale
        return top_w, top_i

    def shared_output(self, x: torch.Tensor) -> torch.Tensor:
        out = self.shared(x)
        return out / self.router.routed_scaling_factor if self._fp16_guard(x) else out


def _warn_cpu_rotary(config: Any) -> None:
    """vLLM 0.32's CPU rotary kernel (``ops.rotary_embedding``) gives wrong values for a
    [tokens, heads > 1, dim] query, the layout DeepSeek's attention passes (dense DeepSeek
    models on vLLM CPU are affected as much; tests/vllm_plugin/test_families.py pins it). Say
    so once, with the way round it (vLLM's torch path of the op)."""
    from vllm.distributed import get_tensor_model_parallel_world_size
    from vllm.logger import init_logger
    from vllm.model_executor.layers.rotary_embedding import RotaryEmbedding
    from vllm.platforms import current_platform

    heads = int(config.num_attention_heads) // get_tensor_model_parallel_world_size()
    if current_platform.is_cpu() and heads > 1 and RotaryEmbedding.enabled():
        init_logger("vllm.tuckerize").warning_once(
            "tuckerize: vLLM's CPU rotary kernel is wrong for DeepSeek's query layout with %d heads per rank; "
            "serve with compilation_config={'custom_ops': ['-rotary_embedding']} "
            "(vllm serve ... -cc '{\"custom_ops\": [\"-rotary_embedding\"]}')", heads)


def load_routed_factors(model: nn.Module, weights, load_rest):
    """vLLM's hand-rolled DeepSeek loader looks every tensor up among the model's parameters;
    the Tucker factors are buffers of the experts. This hands each layer's factor tensors
    (``...mlp.experts.{gate,up,down}.{U_E,U_H,U_I,core}``, plain or quantised) to that layer's
    ``experts.load_weights`` and everything else to ``load_rest`` (the parent's loader).
    Factors of layers this rank does not build (pipeline parallelism) are dropped."""
    blocks = {f"{m.layer_name}.experts.": m for m in model.modules() if isinstance(m, TuckerMoE)}
    pending: dict[str, dict[str, torch.Tensor]] = {}
    loaded: set[str] = set()

    def flush(prefix: str) -> None:
        loaded.update(prefix + n for n in blocks[prefix].experts.load_weights(pending.pop(prefix).items()))

    def others():
        for name, tensor in weights:
            prefix = _experts_prefix(name)
            if prefix is None:
                yield name, tensor
            elif prefix in blocks:
                stored = pending.setdefault(prefix, {})
                stored[name[len(prefix):]] = tensor
                if _complete(stored):
                    flush(prefix)

    loaded |= set(load_rest(others()))
    for prefix in list(pending):
        flush(prefix)  # an incomplete layer: experts.load_weights names what is missing
    return loaded


def _experts_prefix(name: str) -> str | None:
    """``model.layers.3.mlp.experts.`` for a Tucker factor tensor name, else None."""
    head, sep, tail = name.partition(".mlp.experts.")
    parts = tail.split(".")
    if not sep or len(parts) < 2 or parts[0] not in PROJECTIONS or parts[1] not in FACTORS:
        return None
    return head + sep


def _complete(stored: dict[str, torch.Tensor]) -> bool:
    return all(f"{p}.{f}" in stored or all(f"{p}.{f}{s}" in stored for s in SUFFIXES)
               for p in PROJECTIONS for f in FACTORS)

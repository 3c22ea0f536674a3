"""The MoE block that replaces vLLM's fused-MoE block in a Tucker model.

Axes: T tokens, K experts per token, E experts, H hidden, r_H the hidden-side rank of down.

``TuckerMoE(prefix=...)`` stands in for vLLM's ``Qwen3MoeSparseMoeBlock`` / ``MixtralMoE`` /
``OlmoeMoE``: it takes whatever arguments those take and reads E, H, I, top-k, ranks and
the router kind from the model config (:func:`tuckerize.arch.moe_spec`, the ``tucker``
section). Its children:

- ``gate``: the router weight [E, H], replicated (loaded by vLLM's own loader from
  ``...mlp.gate.weight``); routing is tuckerize's (:func:`tuckerize.runtime.routing.route`,
  identical to transformers').
- ``experts``: a :class:`tuckerize.runtime.tucker_experts.TuckerExperts` holding only this
  tensor-parallel rank's factors (layout ``intermediate``: rows I_r of U_I) and the per-expert
  cores ``G_e = U_E[e] x core`` formed once at load. Dense expert weights [E, 2I, H] /
  [E, H, I] are never formed.

Forward: ``s = experts.partial(x, top_k_index, top_k_weights)`` [T, r_H] on each rank, one
``tensor_model_parallel_all_reduce`` of those r_H values per token, then ``s U_H,down^T``.
The whole block runs as one opaque custom op (``torch.ops.vllm.tuckerize_moe``) so that vLLM's
torch.compile graph treats it like its own fused MoE op (routing is data dependent).
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
import torch.nn as nn

from tuckerize.arch import FACTORS, PROJECTIONS, moe_spec
from tuckerize.errors import ShardError
from tuckerize.runtime.routing import RouterSpec, route
from tuckerize.runtime.tucker_experts import ParallelContext, TuckerExperts

OP_NAME = "tuckerize_moe"


class VllmTuckerExperts(TuckerExperts):
    """TuckerExperts with vLLM's per-module ``load_weights`` hook: takes the twelve factor
    tensors ``{gate,up,down}.{U_E,U_H,U_I,core}`` (full, unsharded; sliced to this rank by
    :meth:`TuckerExperts.load_factors`) and forms the per-expert cores."""

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        tensors = dict(weights)
        expected = {f"{p}.{f}" for p in PROJECTIONS for f in FACTORS}
        unexpected = set(tensors) - expected
        if unexpected:
            raise ShardError(f"unexpected expert tensors {sorted(unexpected)[:3]}: this checkpoint's experts are not "
                             "Tucker factors; make it with `tuckerize decompose`")
        with torch.no_grad():
            self.load_factors(tensors)  # raises a one-line ShardError naming a missing factor
        return set(tensors)


class TuckerMoE(nn.Module):
    """Router + Tucker experts for one decoder layer; see the module docstring."""

    def __init__(self, *args: Any, prefix: str = "", **kwargs: Any):
        super().__init__()
        from vllm.config import get_current_vllm_config
        from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size
        from vllm.model_executor.models.utils import extract_layer_index

        vllm_config = get_current_vllm_config()
        hf = vllm_config.model_config.hf_config
        config = hf.to_dict()
        spec = moe_spec(config)
        layer = extract_layer_index(prefix)
        entry = config["tucker"]["layers"].get(str(layer))
        if entry is None:
            raise ShardError(f"layer {layer} has no Tucker factors in config.json's tucker section; "
                             "the checkpoint does not match its config")
        ranks = {p: tuple(entry[p]["ranks"]) for p in PROJECTIONS}
        E, H, I = spec.shape
        self.hidden_size = H
        self.layer_name = prefix
        self.router = RouterSpec.from_config(spec.arch, config, E, spec.top_k)
        tp_rank, tp_size = get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size()
        # Attributes vLLM's MixtureOfExperts bookkeeping reads from a MoE block.
        self.n_routed_experts = self.n_logical_experts = self.n_physical_experts = E
        self.n_local_physical_experts = E
        self.n_redundant_experts = 0
        self.tp_size = tp_size
        self.gate = nn.Linear(H, E, bias=False)
        self.experts = VllmTuckerExperts(E, H, I, ranks, layout="intermediate",
                                         parallel=ParallelContext(rank=tp_rank, world=tp_size),
                                         act=config.get("hidden_act", "silu"))
        ctx = vllm_config.compilation_config.static_forward_context
        if prefix in ctx:
            raise ValueError(f"Duplicate layer name: {prefix}")
        ctx[prefix] = self

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, self.hidden_size)
        out = torch.ops.vllm.tuckerize_moe(x, self.layer_name)
        return out.view(shape)

    def forward_impl(self, x: torch.Tensor) -> torch.Tensor:
        """[T, H] -> [T, H]: route, this rank's partial sum, one all-reduce of r_H values, U_H,d^T."""
        from vllm.distributed import tensor_model_parallel_all_reduce

        top_w, top_i = route(x, self.gate.weight, self.router)
        s = self.experts.partial(x, top_i, top_w)
        if self.tp_size > 1:
            s = tensor_model_parallel_all_reduce(s)
        return self.experts.finish(s).to(x.dtype)


def _tuckerize_moe(hidden_states: torch.Tensor, layer_name: str) -> torch.Tensor:
    from vllm.forward_context import get_forward_context

    layer = get_forward_context().no_compile_layers[layer_name]
    return layer.forward_impl(hidden_states)


def _tuckerize_moe_fake(hidden_states: torch.Tensor, layer_name: str) -> torch.Tensor:
    return torch.empty_like(hidden_states)


_OP_REGISTERED = False


def register_op() -> None:
    """Register ``torch.ops.vllm.tuckerize_moe`` once per process."""
    global _OP_REGISTERED
    if _OP_REGISTERED or hasattr(torch.ops.vllm, OP_NAME):
        _OP_REGISTERED = True
        return
    from vllm.utils.torch_utils import direct_register_custom_op

    direct_register_custom_op(op_name=OP_NAME, op_func=_tuckerize_moe, fake_impl=_tuckerize_moe_fake)
    _OP_REGISTERED = True

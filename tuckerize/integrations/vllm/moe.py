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
  tensor-parallel rank's factors and the per-expert cores ``G_e = U_E[e] x core`` formed
  once at load, in the layout :func:`serving_layout` chooses: the one with the fewest
  multiply-adds per rank for this checkpoint and ``--tensor-parallel-size``
  (:func:`tuckerize.runtime.layout.choose_layout`, as ``tuckerize shard`` chooses), or
  ``TUCKERIZE_LAYOUT=intermediate|expert|hybrid``; ``--enable-expert-parallel`` means
  ``expert``. Where experts are split, they are assigned to ranks by the routing load the
  checkpoint's calibration measured, as ``tuckerize shard`` assigns them
  (:func:`tuckerize.parallel.assign_experts`). Factors stored quantised
  (``--factor-dtype``) are dequantised once, at load. Dense expert weights [E, 2I, H] /
  [E, H, I] are never formed.

Forward: ``s = experts.partial(x, top_k_index, top_k_weights)`` [T, r_H] on each rank, one
all-reduce of those r_H values per token over vLLM's tensor-parallel group, then
``experts.finish(s)`` (``s U_H,down^T``; in ``hybrid`` this rank's H/N columns and an
all-gather). The collectives are vLLM's own (:class:`VllmParallel`).
The whole block runs as one opaque custom op (``torch.ops.vllm.tuckerize_moe``), registered as
vLLM registers its own fused-MoE op (fake implementation, vLLM's stride tag read from its op,
its layer-name type): vLLM's torch.compile graph holds it as a unit and its CUDA graphs
capture it, since the experts' forward has static shapes and no host synchronisation. The
kernel (:mod:`tuckerize.runtime.kernels`: Triton on CUDA, grouped products on the CPU) is
chosen once per model and logged in one line; one that a CUDA graph cannot capture (only if
forced with ``TUCKERIZE_KERNEL``) is kept out of vLLM's CUDA graphs at load
(:func:`keep_out_of_cuda_graphs`), so that a capture never fails.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
import torch.nn as nn

from tuckerize.arch import FACTORS, PROJECTIONS, moe_spec
from tuckerize.errors import InputError, ShardError
from tuckerize.parallel import LAYOUTS, ParallelContext
from tuckerize.runtime.kernels import KernelChoice, choose_kernel
from tuckerize.runtime.moe import routed_experts
from tuckerize.runtime.routing import RouterSpec
from tuckerize.runtime.tucker_experts import TuckerExperts

OP_NAME = "tuckerize_moe"
#: Environment variable that picks the tensor-parallel layout of the Tucker experts.
LAYOUT_ENV = "TUCKERIZE_LAYOUT"


class VllmParallel(ParallelContext):
    """vLLM's tensor-parallel group as a :class:`~tuckerize.parallel.ParallelContext`: the
    experts' collectives go through vLLM's communicators (custom all-reduce, shared memory
    on the CPU, NCCL/HCCL), not a process group of ours."""

    def _all_reduce(self, tensor):
        from vllm.distributed import tensor_model_parallel_all_reduce

        return tensor_model_parallel_all_reduce(tensor)

    def _all_gather(self, tensor, dim: int):
        from vllm.distributed import tensor_model_parallel_all_gather

        return tensor_model_parallel_all_gather(tensor, dim)


_PLANS: dict[tuple, "ServingPlan"] = {}


class ServingPlan:
    """What every MoE block of one served model shares: the layout, why, and the experts
    of each rank per layer (None: contiguous)."""

    def __init__(self, layout: str, reason: str, costs: Mapping[str, Mapping[str, float]] | None,
                 assignment: Mapping[int, Mapping[str, Any]]):
        self.layout, self.reason, self.costs, self.assignment = layout, reason, costs, assignment

    def experts(self, layer: int, rank: int) -> list[int] | None:
        entry = self.assignment.get(layer)
        return list(entry["ranks"][rank]) if entry and entry["assigned"] else None

    def describe(self, tp: int) -> str:
        text = f"layout {self.layout} at tensor-parallel size {tp} ({self.reason}"
        if self.costs:
            text += "; multiply-adds per token on the slowest rank: " + ", ".join(
                f"{k} {v['macs'] / 1e6:.2f}M" for k, v in self.costs.items())
        moved = [a for a in self.assignment.values() if a["assigned"]]
        if moved:
            text += (f"; experts assigned to ranks by measured load in {len(moved)} layers, busiest rank "
                     f"{max(a['imbalance_contiguous'] for a in moved):.0%} -> {max(a['imbalance'] for a in moved):.0%} "
                     "above the mean")
        return text + ")"


def serving_layout(config: Mapping[str, Any], tp: int, *, expert_parallel: bool = False, data_parallel: int = 1,
                   requested: str | None = None, folder: str | Path | None = None) -> ServingPlan:
    """The layout the served model uses: ``requested`` (default: the ``TUCKERIZE_LAYOUT``
    environment variable, else ``auto``) or, under vLLM's expert parallelism, ``expert``;
    ``auto`` is :func:`tuckerize.runtime.layout.choose_layout`. Experts are assigned by the
    routing load saved with the checkpoint's calibration statistics in ``folder``, as
    ``tuckerize shard`` assigns them. A bad request is a one-line :class:`InputError`."""
    requested = (requested if requested is not None else os.environ.get(LAYOUT_ENV, "auto")).strip() or "auto"
    if requested not in (*LAYOUTS, "auto"):
        raise InputError(f"{LAYOUT_ENV}={requested} is not one of auto, {', '.join(LAYOUTS)}")
    layout = None
    if expert_parallel:
        if data_parallel > 1:
            raise InputError("tuckerize's vLLM plugin runs expert parallelism within the tensor-parallel group only; "
                             "use --tensor-parallel-size without --data-parallel-size, or drop --enable-expert-parallel")
        if requested not in ("auto", "expert"):
            raise InputError(f"--enable-expert-parallel splits experts over ranks (layout expert), but {LAYOUT_ENV}="
                             f"{requested}; drop one of the two")
        layout, reason = "expert", "--enable-expert-parallel"
    elif requested != "auto":
        layout, reason = requested, f"{LAYOUT_ENV}={requested}"
    elif tp == 1:
        reason = "one rank"
    else:
        reason = "the fewest multiply-adds per rank among layouts sending no more than dense tensor parallelism"
    from tuckerize.runtime.layout import layout_plan

    layout, costs, assignment = layout_plan(config, tp, layout, folder)
    return ServingPlan(layout, reason, costs, assignment)


def _plan_for(vllm_config: Any, config: Mapping[str, Any], tp: int) -> ServingPlan:
    """:func:`serving_layout` once per model and process (every MoE block asks)."""
    parallel = vllm_config.parallel_config
    ep, dp = bool(parallel.enable_expert_parallel), int(parallel.data_parallel_size)
    folder = vllm_config.model_config.model
    key = (str(folder), tp, ep, dp, os.environ.get(LAYOUT_ENV, "auto"))
    if key not in _PLANS:
        _PLANS[key] = serving_layout(config, tp, expert_parallel=ep, data_parallel=dp, folder=folder)
    return _PLANS[key]


class VllmTuckerExperts(TuckerExperts):
    """TuckerExperts with vLLM's per-module ``load_weights`` hook: takes the twelve factor
    tensors ``{gate,up,down}.{U_E,U_H,U_I,core}`` (full, unsharded; sliced to this rank by
    :meth:`TuckerExperts.load_factors`), each as stored: float32, bfloat16, or quantised
    (``X.qweight/.qscale/.qshape``, :mod:`tuckerize.quant`, dequantised here once), and
    forms the per-expert cores."""

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        from tuckerize.quant import decode, logical_names, stored_suffixes

        stored = dict(weights)
        expected = {f"{p}.{f}" for p in PROJECTIONS for f in FACTORS}
        names = logical_names(stored)
        unexpected = set(names) - expected
        if unexpected:
            raise ShardError(f"unexpected expert tensors {sorted(unexpected)[:3]}: this checkpoint's experts are not "
                             "Tucker factors; make it with `tuckerize decompose`")
        for name in names:
            suffixes = stored_suffixes(stored, name)
            if name not in stored and any(f"{name}{s}" not in stored for s in suffixes):
                raise ShardError(f"factor {name} is stored quantised but incomplete (needs {', '.join(suffixes)}); "
                                 "the checkpoint is damaged: decompose again")
        tensors = {name: decode(stored, name) for name in names}
        with torch.no_grad():
            self.load_factors(tensors)  # raises a one-line ShardError naming a missing factor
        return set(stored)


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
        self._op_layer_name = encode_layer_name(prefix)
        self.router = RouterSpec.from_config(spec.arch, config, E, spec.top_k)
        tp_rank, tp_size = get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size()
        self.plan = _plan_for(vllm_config, config, tp_size)
        self.tp_size = tp_size
        self.kernel = serving_kernel(vllm_config)  # what the experts will choose at load (logged once)
        self.gate = nn.Linear(H, E, bias=False)
        self.experts = VllmTuckerExperts(E, H, I, ranks, layout=self.plan.layout,
                                         parallel=VllmParallel(rank=tp_rank, world=tp_size),
                                         act=config.get("hidden_act", "silu"),
                                         experts=self.plan.experts(layer, tp_rank))
        # Attributes vLLM's MixtureOfExperts bookkeeping reads from a MoE block.
        self.n_routed_experts = self.n_logical_experts = self.n_physical_experts = E
        self.n_local_physical_experts = self.experts.down.U_E.shape[0]
        self.n_redundant_experts = 0
        ctx = vllm_config.compilation_config.static_forward_context
        if prefix in ctx:
            raise ValueError(f"Duplicate layer name: {prefix}")
        ctx[prefix] = self

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, self.hidden_size)
        out = torch.ops.vllm.tuckerize_moe(x, self._op_layer_name)
        return out.view(shape)

    def forward_impl(self, x: torch.Tensor) -> torch.Tensor:
        """[T, H] -> [T, H]: route, this rank's partial sum, one all-reduce of r_H values, U_H,d^T."""
        return routed_experts(x, self.gate.weight, self.router, self.experts)


def _layer_names():
    """``(type, encode, resolve)`` of layer names in this vLLM's custom ops, as its own MoE op
    passes them: the hoisted opaque ``LayerName`` where vLLM has it (torch >= 2.11: lifted as
    a graph input, so the layers' compiled pieces are one graph), else the plain string."""
    from vllm.utils import torch_utils

    encode = getattr(torch_utils, "_encode_layer_name", None)
    resolve = getattr(torch_utils, "_resolve_layer_name", None)
    if encode is None or resolve is None:
        return str, (lambda name: name), (lambda name: name)
    return getattr(torch_utils, "LayerNameType", str), encode, resolve


def _stride_tags() -> tuple:
    """The stride tag(s) vLLM's own fused-MoE op carries in the installed vLLM
    (``needs_fixed_stride_order`` in 0.32, ``needs_exact_strides`` in 0.34), read from that
    op; torch's newer tag where the op is not registered."""
    import importlib

    importlib.import_module("vllm.model_executor.layers.fused_moe")  # registers vllm::moe_forward
    try:
        own = torch.ops.vllm.moe_forward.default.tags
    except (AttributeError, RuntimeError):
        own = ()
    tags = tuple(t for t in own if "stride" in str(t))
    if not tags:
        tag = getattr(torch.Tag, "needs_exact_strides", None) or getattr(torch.Tag, "needs_fixed_stride_order", None)
        tags = (tag,) if tag is not None else ()
    return tags


def op_tags(capturable: bool = True) -> tuple:
    """Tags of ``vllm::tuckerize_moe``: vLLM's MoE op's stride tag, and torch's
    ``cudagraph_unsafe`` (where torch has it) when the experts' kernel is not capturable."""
    tags = _stride_tags()
    unsafe = getattr(torch.Tag, "cudagraph_unsafe", None)
    if not capturable and unsafe is not None:
        tags += (unsafe,)
    return tags


def _tuckerize_moe_fake(hidden_states: torch.Tensor, layer_name) -> torch.Tensor:
    return torch.empty_like(hidden_states)


_OP: dict[str, Any] = {}


_KERNELS: dict[int, KernelChoice] = {}


def serving_kernel(vllm_config: Any) -> KernelChoice:
    """The kernel the Tucker experts of this model will run (they choose it again, the same
    way, when their factors are loaded: :func:`tuckerize.runtime.kernels.choose_kernel` on
    the device vLLM builds the model on, in the model's dtype), once per model: logged in one
    line, and where it is not capturable on CUDA the op is kept out of vLLM's CUDA graphs
    (:func:`keep_out_of_cuda_graphs`)."""
    key = id(vllm_config)
    if key not in _KERNELS:
        from vllm.logger import init_logger

        hf = vllm_config.model_config.hf_config
        device = torch.get_default_device()  # vLLM builds the model under `with target_device:`
        choice = choose_kernel(device, vllm_config.model_config.dtype, getattr(hf, "hidden_act", "silu"))
        line = f"tuckerize: Tucker experts kernel {choice.describe()}"
        if device.type == "cuda" and not choice.capturable:
            line += "; " + keep_out_of_cuda_graphs(vllm_config.compilation_config)
        init_logger("vllm.tuckerize").info(line)
        _KERNELS[key] = choice
    return _KERNELS[key]


def keep_out_of_cuda_graphs(compilation_config: Any) -> str:
    """Keep ``vllm::tuckerize_moe`` out of every CUDA graph vLLM captures: a splitting op
    (piecewise graphs stop around it, it runs eagerly between them), and full graphs (which
    would capture it with the rest) replaced by piecewise ones (none without piecewise
    compilation). Returns what it did, for the log line."""
    from vllm.config import CompilationMode, CUDAGraphMode

    op = f"vllm::{OP_NAME}"
    done = []
    piecewise = compilation_config.mode == CompilationMode.VLLM_COMPILE
    if piecewise:
        if compilation_config.splitting_ops is None:
            compilation_config.splitting_ops = []
        if op not in compilation_config.splitting_ops:
            compilation_config.splitting_ops.append(op)
        done.append(f"{op} added to vLLM's splitting ops")
    mode = compilation_config.cudagraph_mode
    if mode is not None and mode.has_full_cudagraphs():
        compilation_config.cudagraph_mode = CUDAGraphMode.PIECEWISE if piecewise else CUDAGraphMode.NONE
        done.append(f"cudagraph_mode {mode.name} -> {compilation_config.cudagraph_mode.name}")
    return "kept out of CUDA graphs: " + (", ".join(done) or "none are captured")


def register_op() -> None:
    """Register ``torch.ops.vllm.tuckerize_moe(hidden_states, layer_name) -> out`` once per
    process, the way vLLM registers its own MoE op: an opaque op with a fake (shape-only)
    implementation so that vLLM's torch.compile graph and CUDA graphs hold it as a unit,
    no mutated arguments (it returns a new tensor), vLLM's stride tag, the layer name as
    vLLM's own ops take it (:func:`_layer_names`)."""
    if _OP:
        return
    from vllm.config import get_current_vllm_config
    from vllm.forward_context import get_forward_context
    from vllm.utils.torch_utils import direct_register_custom_op

    name_type, encode, resolve = _layer_names()

    def op(hidden_states: torch.Tensor, layer_name) -> torch.Tensor:
        layer = get_forward_context().no_compile_layers[resolve(layer_name)]
        return layer.forward_impl(hidden_states)

    # the schema is inferred from the annotations: the real types, not postponed strings
    op.__annotations__ = {"hidden_states": torch.Tensor, "layer_name": name_type, "return": torch.Tensor}
    _tuckerize_moe_fake.__annotations__ = dict(op.__annotations__)
    if not hasattr(torch.ops.vllm, OP_NAME):
        direct_register_custom_op(op_name=OP_NAME, op_func=op, mutates_args=[], fake_impl=_tuckerize_moe_fake,
                                  tags=op_tags(serving_kernel(get_current_vllm_config()).capturable))
    _OP.update(encode=encode)


def encode_layer_name(name: str):
    """``name`` as the op takes it (after :func:`register_op`)."""
    return _OP["encode"](name) if _OP else name

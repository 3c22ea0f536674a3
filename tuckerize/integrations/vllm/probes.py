"""What a loaded vLLM model holds and does, read on every rank through ``LLM.apply_model``.

vLLM runs the function given to ``apply_model`` on each worker, and with more than one
worker process it sends it pickled: by reference, so it must be importable there (a function
of a script's ``__main__`` is not). Each probe here takes the model and returns plain data,
one result per rank:

* :func:`tensor_shapes`, :func:`linear_partitions`: what each rank holds and how tensor
  parallelism split each layer (the plugin's tests);
* :func:`weight_bytes`, :func:`kernels_used`: the memory of the weights, the Tucker kernels
  chosen at load (``bench/serve.py``);
* :func:`moe_block_names`, :func:`install_moe_timers`, :func:`take_moe_times`: the MoE blocks,
  and the time of every call of theirs, router and experts, as the engine's steps run it
  (``bench/serve.py``).
"""

from __future__ import annotations

import time
from typing import Any

from torch import nn

from tuckerize.integrations.vllm.moe import TuckerMoE


def tensor_shapes(model: Any) -> list[list[Any]]:
    """``[[name, shape], ...]`` of every parameter and buffer of a loaded vLLM model, e.g.
    ``LLM(...).apply_model(tensor_shapes)``: one list per rank, to check what each rank holds."""
    named = list(model.named_parameters()) + list(model.named_buffers())
    return [[name, list(t.shape)] for name, t in named]


def linear_partitions(model: Any) -> list[list[Any]]:
    """``[[name, class, out_per_rank, in_per_rank], ...]`` of every vLLM linear layer of a loaded
    model, and ``[name, class]`` of every Tucker MoE block, e.g. ``LLM(...).apply_model(
    linear_partitions)``: one list per rank, to check how tensor parallelism split each layer
    (on the CPU vLLM repacks linear weights, so their parameter shapes do not tell)."""
    from vllm.model_executor.layers.linear import LinearBase

    out: list[list[Any]] = []
    for name, module in model.named_modules():
        if isinstance(module, TuckerMoE):
            out.append([name, type(module).__name__])
        elif isinstance(module, LinearBase):
            out.append([name, type(module).__name__,
                        int(getattr(module, "output_size_per_partition", module.output_size)),
                        int(getattr(module, "input_size_per_partition", module.input_size))])
    return out


def weight_bytes(model: Any) -> dict[str, int]:
    """Bytes of every parameter and buffer of a loaded vLLM model (``all``) and of its MoE
    blocks (``moe``: router and experts, with the per-expert cores formed at load), e.g.
    ``LLM(...).apply_model(weight_bytes)``: one dict per rank."""
    named = list(model.named_parameters()) + list(model.named_buffers())
    moe = sum(t.numel() * t.element_size() for n, t in named if ".mlp." in n)
    return {"all": sum(t.numel() * t.element_size() for _, t in named), "moe": moe}


def kernels_used(model: Any) -> list[str]:
    """The Tucker experts' kernels of a loaded vLLM model, as each chose at load (e.g.
    ``LLM(...).apply_model(kernels_used)``: one list per rank; [] for dense experts)."""
    return sorted({m.kernel.describe() for m in model.modules()
                   if getattr(m, "kernel", None) is not None and hasattr(m.kernel, "describe")})


def moe_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The MoE blocks of a model: the outermost modules with both a ``gate`` (the router) and an
    ``experts`` child. That is vLLM's block of every MoE family (``Qwen3MoeSparseMoeBlock``,
    ``MixtralMoE``, ``DeepseekV2MoE``, ...: router, FusedMoE, shared experts where the family has
    them) and the plugin's (:class:`~tuckerize.integrations.vllm.moe.TuckerMoE` and the
    families' blocks around the Tucker experts)."""
    found: list[tuple[str, nn.Module]] = []
    for name, m in model.named_modules():
        if any(name.startswith(outer + ".") for outer, _ in found):
            continue
        children = dict(m.named_children())
        if "gate" in children and "experts" in children:
            found.append((name, m))
    return found


def moe_block_names(model: nn.Module) -> list[str]:
    """The names of :func:`moe_blocks` (e.g. ``LLM(...).apply_model(moe_block_names)``)."""
    return [name for name, _ in moe_blocks(model)]


def install_moe_timers(model: nn.Module) -> int:
    """Time every call of the model's MoE blocks (:func:`moe_blocks`) on this worker: each call
    appends (tokens, seconds) to ``model._moe_calls``. Returns how many blocks it wrapped (a
    block already wrapped is not wrapped again). Eager only (``enforce_eager``): the wrapped
    ``forward`` is what the step runs; under torch.compile the compiled graph would bypass it."""
    if not hasattr(model, "_moe_calls"):
        model._moe_calls = []
    timed = 0
    for _, m in moe_blocks(model):
        if getattr(m, "_moe_timed", False):
            continue

        def forward(hidden_states, *args, _forward=m.forward, **kwargs):
            t = time.perf_counter()
            out = _forward(hidden_states, *args, **kwargs)
            model._moe_calls.append((hidden_states.numel() // hidden_states.shape[-1], time.perf_counter() - t))
            return out

        m.forward, m._moe_timed = forward, True
        timed += 1
    return timed


def take_moe_times(model: nn.Module) -> list[tuple[int, float]]:
    """The (tokens, seconds) the timers recorded on this worker since the last call, and a fresh record."""
    calls, model._moe_calls = getattr(model, "_moe_calls", []), []
    return calls

"""The models ``eval`` scores (:class:`EvalModel`) and the runtimes that load them, a registry by name.

A runtime is a function ``load(path, parallel, device, dtype, *, verify, seqlen, kl_topk) ->
EvalModel`` registered under a name (:func:`register_runtime`); ``--runtime NAME`` picks one.
Built in: ``native`` (the tensor-parallel model of :mod:`tuckerize.runtime.model`), ``hf``
(transformers with the experts modules swapped, one process) and ``auto`` (native where it
covers the architecture, else hf).

Integrations register their own runtime when their module is imported: the vLLM plugin's
``tuckerize.integrations.vllm.evaluate`` registers ``vllm``. The core never imports an
integration by an import statement; a name it does not know yet is loaded on first use:

1. from :data:`INTEGRATION_RUNTIMES`, the integrations shipped with tuckerize (a module path
   per runtime name, imported with :mod:`importlib` only when that name is asked for);
2. else from the ``tuckerize.runtimes`` entry-point group of installed distributions (a
   runtime outside this repository: ``[project.entry-points."tuckerize.runtimes"] NAME =
   "module"``, the module registering itself on import, or ``"module:function"``, a function
   called once that registers it).

A runtime may name another for the original model (``baseline``): vLLM serves the model
under test, the baseline is scored by ``auto``. A runtime that starts its own tensor-parallel
workers (``tensor_parallel=True``: vLLM) is handed ``eval --tp N`` as ``tensor_parallel=N``;
the others take their ranks from torchrun, and ``--tp`` is refused for them.
"""

from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass
from typing import Callable

import torch

from tuckerize.errors import BackendError, InputError
from tuckerize.parallel import ParallelContext
from tuckerize.runtime.loader import TensorSource
from tuckerize.runtime.model import CausalLM, native_supported

#: Runtimes that tuckerize's own integrations provide: name -> the module registering it.
INTEGRATION_RUNTIMES = {"vllm": "tuckerize.integrations.vllm.evaluate"}
#: Entry-point group for runtimes of other distributions.
ENTRY_POINT_GROUP = "tuckerize.runtimes"


@dataclass
class EvalModel:
    name: str
    forward: Callable[[torch.Tensor], torch.Tensor]
    module: torch.nn.Module
    runtime: str
    moe_blocks: dict[int, torch.nn.Module]


@dataclass(frozen=True)
class Runtime:
    """A registered runtime: its ``load`` function, the runtime that scores the original
    model (``baseline``; None: this one), and whether it takes a tensor-parallel size of its
    own (``tensor_parallel``: ``load(..., tensor_parallel=N)``)."""

    name: str
    load: Callable[..., EvalModel]
    baseline: str | None = None
    tensor_parallel: bool = False

    @property
    def baseline_runtime(self) -> str:
        return self.baseline or self.name


_RUNTIMES: dict[str, Runtime] = {}


def register_runtime(name: str, load: Callable[..., EvalModel], *, baseline: str | None = None,
                     tensor_parallel: bool = False) -> None:
    """Register (or replace) the runtime ``name``; integrations call this when imported."""
    _RUNTIMES[name] = Runtime(name, load, baseline, tensor_parallel)


def check_tensor_parallel(runtime: Runtime, size: int) -> None:
    """``eval --tp size`` for ``runtime``: a one-line :class:`InputError` where it makes no sense."""
    if size < 1:
        raise InputError(f"--tp {size} must be at least 1")
    if size != 1 and not runtime.tensor_parallel:
        how = ("runs in one process" if runtime.name == "hf" else
               f"takes its ranks from torchrun: torchrun --nproc-per-node {size} -m tuckerize eval ...")
        raise InputError(f"--tp {size} is the tensor-parallel size of a serving runtime (--runtime vllm); "
                         f"--runtime {runtime.name} {how}")


def _entry_point(name: str):
    from importlib.metadata import entry_points

    return next((ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == name), None)


def get_runtime(name: str) -> Runtime:
    """The runtime registered as ``name``, loading its integration on first use (see the
    module docstring); a one-line :class:`~tuckerize.errors.InputError` for an unknown name."""
    if name not in _RUNTIMES:
        if name in INTEGRATION_RUNTIMES:
            importlib.import_module(INTEGRATION_RUNTIMES[name])
        elif (ep := _entry_point(name)) is not None:
            loaded = ep.load()
            if callable(loaded) and name not in _RUNTIMES:
                loaded()
    if name not in _RUNTIMES:
        known = sorted({*_RUNTIMES, *INTEGRATION_RUNTIMES})
        raise InputError(f"--runtime {name} is not one of {', '.join(known)}")
    return _RUNTIMES[name]


def load_model(path: str, parallel: ParallelContext, device, dtype, runtime: str = "auto", verify: bool = True,
               seqlen: int = 2048, kl_topk: int = 256, tensor_parallel: int = 1) -> EvalModel:
    """``path`` loaded by the runtime ``runtime`` (:func:`get_runtime`), at ``tensor_parallel``
    ranks of its own where it starts them (:func:`check_tensor_parallel`)."""
    chosen = get_runtime(runtime)
    check_tensor_parallel(chosen, tensor_parallel)
    extra = {"tensor_parallel": tensor_parallel} if chosen.tensor_parallel else {}
    return chosen.load(path, parallel, device, dtype, verify=verify, seqlen=seqlen, kl_topk=kl_topk, **extra)


def _load_local(path: str, parallel: ParallelContext, device, dtype, *, runtime: str, verify: bool = True,
                **_: object) -> EvalModel:
    """The built-in runtimes: ``native``, ``hf``, or ``auto`` (native where it covers the architecture)."""
    source = TensorSource.open(path, parallel, verify=verify)
    native = native_supported(source.spec.arch.name)
    if runtime == "native" and not native:
        raise InputError(f"the native runtime does not cover {source.spec.arch.classes[0]}; use --runtime hf")
    if runtime == "hf" or (runtime == "auto" and not native):
        if parallel.world > 1:
            raise BackendError("the transformers runtime (--runtime hf) runs in one process; start without torchrun")
        if source.kind == "shard":
            raise InputError("the transformers runtime loads a Tucker checkpoint, not a shard set; pass the unsharded folder")
        from tuckerize.runtime.hf import load_hf_model

        model = load_hf_model(path, dtype=dtype, device=device)
        blocks = {i: model.model.layers[i].mlp for i in source.spec.moe_layers}
        return EvalModel(path, lambda ids: model(ids).logits, model, "hf", blocks)
    model = CausalLM(source, dense_experts=not source.is_tucker, dtype=dtype, device=device).eval()
    return EvalModel(path, model, model, "native", model.moe_blocks())


for _name in ("auto", "native", "hf"):
    register_runtime(_name, functools.partial(_load_local, runtime=_name))

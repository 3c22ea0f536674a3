"""Decode paths of the Tucker experts: static shapes, no host synchronisation, and
Triton kernels, chosen per call by :class:`DecodeDispatch`.

* :func:`~tuckerize.runtime.kernels.static.static_partial` (torch): the reference and
  the fallback (CPU, NPU); capturable in a CUDA graph.
* :func:`~tuckerize.runtime.kernels.triton_moe.triton_partial` (Triton, CUDA): the
  per-pair chain fused into three kernels (imported only when used).

The hook into :class:`~tuckerize.runtime.tucker_experts.TuckerExperts` is its
``decode_impl`` attribute: ``partial`` calls ``decode_impl(module, x, index, weights)``
first and keeps its own (sorted, grouped) path when that returns None.
"""

from __future__ import annotations

import torch

from tuckerize.errors import InputError
from tuckerize.parallel import INPUT_SPLIT_LAYOUTS
from tuckerize.runtime.kernels.static import DecodeFactors, static_partial

import os

IMPLS = ("auto", "static", "triton", "off")
#: Devices on which ``auto`` takes the static path (``static`` forces it everywhere).
AUTO_DEVICES = ("cuda", "npu")

#: environment variable choosing the native runtime's decode path (:func:`default_dispatch`)
ENV = "TUCKERIZE_DECODE"

#: at most this many tokens per MoE call take the decode path in the native runtime: measured
#: faster than the module's own path on the CPU at 1, 4 and 16 tokens (BENCHMARKS.md)
DECODE_TOKENS = 16


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


class DecodeDispatch:
    """``decode_impl`` for TuckerExperts: the static (or Triton) path for at most
    ``max_tokens`` tokens, None (the module's own path) above.

    impl: ``"auto"`` (the static torch path: the Triton kernels have not been timed on a
    GPU yet, see BENCHMARKS.md; :func:`default_dispatch` limits it to accelerators),
    ``"static"``, ``"triton"`` (CUDA; the Triton interpreter elsewhere), ``"off"`` (always None).
    devices: device types the path is used on.
    The choice depends only on static shapes and the device, never on routing values."""

    def __init__(self, impl: str = "auto", max_tokens: int = DECODE_TOKENS,
                 devices: tuple[str, ...] = ("cpu", "cuda", "npu")):
        if impl not in IMPLS:
            raise InputError(f"decode impl {impl!r} is not one of {', '.join(IMPLS)}")
        self.impl, self.max_tokens, self.devices = impl, int(max_tokens), tuple(devices)

    def __call__(self, module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                 top_k_weights: torch.Tensor) -> torch.Tensor | None:
        T = top_k_index.shape[0]
        dev = hidden_states.device.type
        if self.impl == "off" or T > self.max_tokens or T == 0 or dev not in self.devices:
            return None
        if getattr(module, "expert_ids", None) is not None or (module.layout in INPUT_SPLIT_LAYOUTS and module.parallel.world > 1):
            return None  # experts assigned by load, or hybrid's split U_H: the module's own path
        f = DecodeFactors.of(module)
        if self.impl == "triton":
            from tuckerize.runtime.kernels.triton_moe import triton_partial

            return triton_partial(f, hidden_states, top_k_index, top_k_weights)
        return static_partial(f, hidden_states, top_k_index, top_k_weights)


def default_dispatch() -> DecodeDispatch:
    """The native runtime's choice: ``TUCKERIZE_DECODE`` (auto, static, triton, off;
    default auto) for at most :data:`DECODE_TOKENS` tokens per call."""
    impl = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if impl not in IMPLS:
        raise InputError(f"{ENV}={impl!r} is not one of {', '.join(IMPLS)}")
    if impl == "triton" and not triton_available():
        raise InputError(f"{ENV}=triton needs the triton package: pip install triton")
    if impl == "auto":
        # Accelerators only: the static path is what a CUDA graph can capture there; on the
        # CPU the module's own path is as fast at 1 token and 2.6-10x faster at 4-16 tokens
        # (per-pair core gathers are memory-bound; BENCHMARKS.md, quiet-machine run).
        return DecodeDispatch("auto", devices=AUTO_DEVICES)
    return DecodeDispatch(impl)


def install(model: torch.nn.Module, dispatch: DecodeDispatch | None = None) -> int:
    """Set ``decode_impl`` on every Tucker experts module of ``model`` (by default
    :func:`default_dispatch`); returns how many."""
    from tuckerize.runtime.tucker_experts import TuckerExperts

    dispatch = dispatch or default_dispatch()
    n = 0
    for m in model.modules():
        if isinstance(m, TuckerExperts):
            m.decode_impl = dispatch
            n += 1
    return n

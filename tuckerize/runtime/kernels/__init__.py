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

from tuckerize.runtime.kernels.static import DecodeFactors, static_partial

IMPLS = ("auto", "static", "triton", "off")


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


class DecodeDispatch:
    """``decode_impl`` for TuckerExperts: the static (or Triton) path for at most
    ``max_tokens`` tokens, None (the module's own path) above.

    impl: ``"auto"`` (Triton on CUDA when installed, else static torch), ``"static"``,
    ``"triton"`` (error if not installed), ``"off"`` (always None).
    devices: device types the path is used on (CPU measured in BENCHMARKS.md).
    The choice depends only on static shapes and the device, never on routing values."""

    def __init__(self, impl: str = "auto", max_tokens: int = 16, devices: tuple[str, ...] = ("cuda", "npu")):
        if impl not in IMPLS:
            raise ValueError(f"decode impl {impl!r} is not one of {', '.join(IMPLS)}")
        self.impl, self.max_tokens, self.devices = impl, int(max_tokens), tuple(devices)

    def __call__(self, module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                 top_k_weights: torch.Tensor) -> torch.Tensor | None:
        T = top_k_index.shape[0]
        dev = hidden_states.device.type
        if self.impl == "off" or T > self.max_tokens or T == 0 or dev not in self.devices:
            return None
        f = DecodeFactors.of(module)
        use_triton = self.impl == "triton" or (self.impl == "auto" and dev == "cuda" and triton_available())
        if use_triton:
            from tuckerize.runtime.kernels.triton_moe import triton_partial

            return triton_partial(f, hidden_states, top_k_index, top_k_weights)
        return static_partial(f, hidden_states, top_k_index, top_k_weights)


def install(model: torch.nn.Module, dispatch: DecodeDispatch | None = None) -> int:
    """Set ``decode_impl`` on every Tucker experts module of ``model``; returns how many."""
    from tuckerize.runtime.tucker_experts import TuckerExperts

    dispatch = dispatch or DecodeDispatch()
    n = 0
    for m in model.modules():
        if isinstance(m, TuckerExperts):
            m.decode_impl = dispatch
            n += 1
    return n

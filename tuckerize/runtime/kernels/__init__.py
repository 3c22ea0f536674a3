"""Which kernel computes the Tucker experts' per-pair chain, chosen once per device and dtype.

:class:`~tuckerize.runtime.tucker_experts.TuckerExperts` asks :func:`choose_kernel` when its
factors are loaded (and again if it is moved to another device), records the answer
(:class:`KernelChoice`) and calls it on every forward; nothing is probed or decided per call.
Every kernel has static shapes and no host synchronisation, so the module's forward compiles
with ``torch.compile(fullgraph=True, dynamic=True)``; ``capturable`` says whether a CUDA graph
can also capture it on that device.

* ``bags`` (:mod:`~tuckerize.runtime.kernels.cpu_moe`): the CPU's. Decoding-sized calls as a
  dozen operations whatever the routing: every pair's core product in one ``embedding_bag`` per
  projection (weighted sums of the cores' rows, no per-expert product), the dense products
  through oneDNN with ``U_H`` packed at load; prefill-sized calls (more than
  :data:`~tuckerize.runtime.kernels.cpu_moe.BAG_ROWS` pairs per expert) through ``grouped``'s
  per-expert products with the same dense products.
* ``grouped`` (:func:`~tuckerize.runtime.kernels.torch_moe.grouped_partial`): pairs sorted by
  expert, offsets kept on the device, one grouped product per core. On the CPU one matrix
  product per expert that has rows, any dtype; on CUDA torch's grouped_mm, without host
  synchronisation only in bfloat16 on sm90/sm100 (elsewhere its fallback copies the offsets
  to the host: not capturable).
* ``triton`` (:mod:`~tuckerize.runtime.kernels.triton_moe`): the chain fused into three Triton
  kernels; CUDA (the Triton interpreter elsewhere).
* ``gather`` (:func:`~tuckerize.runtime.kernels.torch_moe.gather_partial`): one gathered core
  per pair and batched products; any device, memory-bound, the fallback.

``auto``: CUDA -> ``triton`` when Triton is installed (else ``grouped`` where capturable,
else ``gather``); CPU -> ``bags``; other devices (NPU) -> ``gather``.
``TUCKERIZE_KERNEL=auto|bags|grouped|triton|gather`` overrides it.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from typing import Callable

import torch

from tuckerize.errors import InputError
from tuckerize.runtime.kernels import cpu_moe
from tuckerize.runtime.kernels.torch_moe import (ExpertFactors, alignment, gather_partial, grouped_op, grouped_partial,
                                                 torch_grouped_mm)

KERNELS = ("bags", "grouped", "triton", "gather")
#: environment variable overriding the choice (auto, or one of KERNELS)
ENV = "TUCKERIZE_KERNEL"
#: activations the Triton kernels implement
TRITON_ACTS = ("silu", "swish", "gelu", "gelu_pytorch_tanh")


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


#: dtypes torch's grouped_mm multiplies
GROUPED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _grouped_capturable(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether torch's grouped_mm runs without host synchronisation here (bf16 CUTLASS
    kernels on sm90/sm100; elsewhere on CUDA its fallback reads the offsets on the host)."""
    if device.type != "cuda":
        return device.type == "cpu"
    return dtype == torch.bfloat16 and torch.cuda.get_device_capability(device)[0] in (9, 10)


@dataclass(frozen=True)
class KernelChoice:
    """The kernel a module runs, and why. ``capturable``: no host synchronisation on this
    device (a CUDA graph can capture it); ``bounded``: in the expert-split layouts every
    product stops at this rank's pair count (else the pairs of other ranks' experts are
    computed with weight zero: :meth:`TuckerExperts.cost_per_token` counts them)."""

    name: str
    device: str
    dtype: torch.dtype
    capturable: bool
    bounded: bool
    reason: str
    align: int = 1
    _fn: Callable | None = None
    _prepare: Callable | None = None

    def partial(self, f: ExpertFactors, xg: torch.Tensor, xu: torch.Tensor, expert: torch.Tensor,
                weight: torch.Tensor, top_k: int) -> torch.Tensor:
        return self._fn(f, xg, xu, expert, weight, top_k)

    def prepare(self, module) -> ExpertFactors:
        """What this kernel reads from a loaded module (once per load or move)."""
        if self._prepare is not None:
            return self._prepare(module)
        return ExpertFactors.prepare(module, self.align)

    def describe(self) -> str:
        if self.device == "cuda":
            graph = "capturable in CUDA graphs" if self.capturable else "NOT capturable in CUDA graphs"
        else:
            graph = "static shapes, no host synchronisation"
        return f"{self.name} on {self.device} {str(self.dtype).replace('torch.', '')} ({self.reason}; {graph})"


def _grouped(device: torch.device, dtype: torch.dtype, reason: str) -> KernelChoice:
    mm = grouped_op(dtype, device.type)
    capturable = _grouped_capturable(device, dtype)
    if not capturable:
        reason += "; torch's grouped_mm reads its offsets on the host here (bfloat16 on sm90/sm100 does not)"
    align = alignment(dtype) if device.type == "cuda" else 1  # torch's kernels need 16-byte rows

    def fn(f, xg, xu, expert, weight, top_k):
        return grouped_partial(f, mm, xg, xu, expert, weight, top_k)

    return KernelChoice("grouped", device.type, dtype, capturable, True, reason, align, fn)


def _bags(device: torch.device, dtype: torch.dtype, reason: str) -> KernelChoice:
    mm = grouped_op(dtype, device.type)

    def fn(f, xg, xu, expert, weight, top_k):
        return cpu_moe.bag_partial(f, mm, xg, xu, expert, weight, top_k)

    return KernelChoice("bags", device.type, dtype, True, True, reason, 1, fn, cpu_moe.prepare)


def _triton(device: torch.device, dtype: torch.dtype, reason: str) -> KernelChoice:
    from tuckerize.runtime.kernels.triton_moe import triton_partial  # optional dependency

    return KernelChoice("triton", device.type, dtype, True, True, reason, 1, triton_partial)


def _gather(device: torch.device, dtype: torch.dtype, reason: str) -> KernelChoice:
    return KernelChoice("gather", device.type, dtype, True, False, reason, 1, gather_partial)


def requested_kernel() -> str:
    """``TUCKERIZE_KERNEL`` (default auto); a bad value is a one-line :class:`InputError`."""
    name = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if name not in ("auto", *KERNELS):
        raise InputError(f"{ENV}={name} is not one of auto, {', '.join(KERNELS)}")
    return name


def choose_kernel(device: torch.device | str, dtype: torch.dtype, act: str, requested: str | None = None) -> KernelChoice:
    """The kernel for factors on ``device`` in ``dtype`` with activation ``act``:
    ``requested`` (default :func:`requested_kernel`), or by the rules of the module docstring."""
    device = torch.device(device)
    name = requested or requested_kernel()
    if name not in ("auto", *KERNELS):
        raise InputError(f"kernel {name!r} is not one of auto, {', '.join(KERNELS)}")
    cuda_grouped = torch_grouped_mm() is not None and dtype in GROUPED_DTYPES
    if name == "auto":
        if device.type == "cuda" and triton_available() and act in TRITON_ACTS:
            return _triton(device, dtype, "auto: CUDA with Triton")
        if device.type == "cpu":
            return _bags(device, dtype, "auto: cpu, a dozen operations per call")
        if device.type == "cuda" and cuda_grouped and _grouped_capturable(device, dtype):
            return _grouped(device, dtype, "auto: CUDA bfloat16 with torch's grouped_mm")
        return _gather(device, dtype, f"auto: no capturable grouped product on {device.type} {dtype}")
    why = f"{ENV}={name}" if requested is None else f"requested {name}"
    if name == "grouped":
        if device.type != "cpu" and not cuda_grouped:
            raise InputError(f"{why}: torch's grouped_mm ({torch.__version__}) does not multiply {dtype} on "
                             f"{device.type}; use {ENV}=gather")
        return _grouped(device, dtype, why)
    if name == "bags":
        if device.type != "cpu":
            raise InputError(f"{why}: the bags kernel runs on the CPU; use {ENV}=auto on {device.type}")
        return _bags(device, dtype, why)
    if name == "triton":
        if not triton_available():
            raise InputError(f"{why} needs the triton package: pip install triton")
        if act not in TRITON_ACTS:
            raise InputError(f"{why}: activation {act!r} has no Triton kernel; use {ENV}=grouped or gather")
        if device.type != "cuda" and not _interpreting():
            raise InputError(f"{why}: the Triton kernels run on CUDA (on the CPU only under TRITON_INTERPRET=1)")
        return _triton(device, dtype, why)
    return _gather(device, dtype, why)


__all__ = ["ENV", "KERNELS", "ExpertFactors", "KernelChoice", "choose_kernel", "requested_kernel", "triton_available"]

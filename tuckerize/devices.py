"""Devices and collective backends: cpu/gloo, cuda/nccl, npu/hccl.

torch_npu is imported only when an NPU is asked for; its absence is a clear error.
"""

from __future__ import annotations

from tuckerize.errors import BackendError

BACKENDS = {"cpu": "gloo", "cuda": "nccl", "npu": "hccl"}


def resolve_device(name: str, local_rank: int | None = None, flag: str = "--backend"):
    """A ``torch.device`` for ``cpu``, ``cuda[:N]`` or ``npu[:N]``, checked to exist;
    ``flag``: the command-line option the user chose it with, named in errors."""
    import torch

    kind, _, index = name.partition(":")
    if kind not in BACKENDS:
        raise BackendError(f"device {name!r} is not one of cpu, cuda, npu; pick one of those")
    if kind == "npu":
        try:
            import torch_npu  # noqa: F401
        except ImportError:
            raise BackendError(f"{flag} npu needs torch_npu (Ascend); install torch_npu matching your torch") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise BackendError(f"CUDA is not available to this torch build; use {flag} cpu or install a CUDA torch")
    if kind == "npu" and not torch.npu.is_available():  # type: ignore[attr-defined]
        raise BackendError(f"no Ascend NPU is visible to torch_npu; check the driver or use {flag} cpu")
    if kind == "cpu":
        return torch.device("cpu")
    if index:
        return torch.device(f"{kind}:{int(index)}")
    if local_rank is not None:
        return torch.device(f"{kind}:{local_rank}")
    return torch.device(kind)


def collective_backend(device) -> str:
    return BACKENDS[device.type]

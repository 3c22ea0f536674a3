"""Stacking one MoE layer's experts into semantic ``[E, H, I]`` tensors.

Two on-disk layouts are understood:

* per expert (what ``save_pretrained`` writes): gate/up ``[I, H]``, down ``[H, I]``,
  one tensor per expert, names from :mod:`tuckerize.arch`;
* fused (transformers v5 in-memory layout, written by some converters):
  ``experts.gate_up_proj [E, 2I, H]`` (gate rows first) and ``experts.down_proj [E, H, I]``.

FP8 expert weights (:mod:`tuckerize.fp8`) are dequantised as they are read; their scale
tensors belong to the experts and are replaced by the factors with them.
"""

from __future__ import annotations

from tuckerize.arch import PROJECTIONS, MoESpec
from tuckerize.checkpoint import Checkpoint
from tuckerize.errors import InputError
from tuckerize.fp8 import companion_names


def layout(ckpt: Checkpoint, spec: MoESpec, layer: int) -> str:
    """``"per_expert"`` or ``"fused"``; an error if the layer has neither."""
    if spec.arch.expert_name(layer, "gate", 0) in ckpt:
        return "per_expert"
    if spec.arch.fused_names(layer)[0] in ckpt:
        return "fused"
    raise InputError(
        f"MoE layer {layer} has no expert weights (looked for {spec.arch.expert_name(layer, 'gate', 0)}); "
        "is the checkpoint complete and of the architecture its config names?"
    )


def expert_tensor_names(ckpt: Checkpoint, spec: MoESpec, layer: int) -> list[str]:
    """Every source tensor that the factors of ``layer`` replace (FP8 scales included)."""
    if layout(ckpt, spec, layer) == "fused":
        names = list(spec.arch.fused_names(layer))
    else:
        names = [spec.arch.expert_name(layer, p, e) for p in PROJECTIONS for e in range(spec.num_experts)]
        missing = [n for n in names if n not in ckpt]
        if missing:
            raise InputError(f"expert tensor {missing[0]} is missing from the checkpoint; download it again")
    return names + [s for n in names for s in companion_names(n) if s in ckpt]


def _check_finite(tensor, name: str) -> None:
    import torch

    if not bool(torch.isfinite(tensor).all()):
        raise InputError(f"tensor {name} contains NaN or Inf; the checkpoint is damaged, download it again")


def stack_projection(ckpt: Checkpoint, spec: MoESpec, layer: int, projection: str, dtype=None, device=None):
    """The routed experts of one projection as a float32 (or ``dtype``) tensor ``[E, H, I]``
    on ``device`` (default CPU); FP8 experts are dequantised there."""
    import torch

    dtype = dtype or torch.float32
    E, H, I = spec.shape
    if layout(ckpt, spec, layer) == "fused":
        gate_up, down = spec.arch.fused_names(layer)
        name = down if projection == "down" else gate_up
        t = ckpt.get(name, dequantize=True, device=device)
        if device is not None:
            t = t.to(device)
        _check_finite(t, name)
        want = (E, H, I) if projection == "down" else (E, 2 * I, H)
        if tuple(t.shape) != want:
            raise InputError(f"{name} has shape {list(t.shape)}, expected {list(want)} from config.json")
        if projection == "down":
            return t.to(dtype).contiguous()
        half = t[:, :I, :] if projection == "gate" else t[:, I:, :]
        return half.transpose(1, 2).to(dtype).contiguous()

    out = torch.empty((E, H, I), dtype=dtype, device=device)
    want = (H, I) if projection == "down" else (I, H)
    for e in range(E):
        name = spec.arch.expert_name(layer, projection, e)
        t = ckpt.get(name, dequantize=True, device=device)
        if tuple(t.shape) != want:
            raise InputError(f"{name} has shape {list(t.shape)}, expected {list(want)} from config.json")
        _check_finite(t, name)
        out[e] = t if projection == "down" else t.T
    return out

"""FP8 checkpoints: which tensors are quantised, and their dequantisation on read.

Two on-disk layouts are understood, both told apart by ``config.json``'s
``quantization_config``:

* block FP8 (DeepSeek-V3/R1, Qwen's ``-FP8`` releases): ``{quant_method: fp8, fmt: e4m3,
  weight_block_size: [b0, b1], activation_scheme: dynamic}``. A quantised weight
  ``X.weight [O, I]`` (float8_e4m3fn) has ``X.weight_scale_inv [ceil(O/b0), ceil(I/b1)]``
  (float32; despite the name it multiplies): ``W[o, i] = X.weight[o, i] *
  X.weight_scale_inv[o // b0, i // b1]``, the last row and column of blocks partial when
  ``b0``/``b1`` do not divide ``O``/``I``.
* compressed-tensors (llm-compressor's ``float-quantized`` format): ``{quant_method:
  compressed-tensors, config_groups: {...: {weights: {strategy, block_structure}}}}``.
  ``X.weight`` (FP8) has ``X.weight_scale`` per tensor (``[]`` or ``[1]``), per output
  channel (``[O, 1]``) or per block (``[ceil(O/b0), ceil(I/b1)]``); static activation
  schemes add ``X.input_scale`` (activations only, not needed for the weight).

Leading axes are allowed (fused experts ``[E, 2I, H]`` with scales ``[E, ...]``).
Dequantisation is one tensor at a time, in float32 (every e4m3 value is exact in
float32), on the device asked for. Checkpoints keep FP8 tensors as they are; only
readers that compute with a tensor ask for it dequantised
(``Checkpoint.get(name, dequantize=True)``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from tuckerize.errors import InputError

#: safetensors dtype strings of FP8 tensors.
FP8_DTYPES = ("F8_E4M3", "F8_E5M2")
#: Suffixes of the tensors stored beside a quantised weight ``X.weight`` (``X.<suffix>``).
SCALE_SUFFIXES = ("weight_scale_inv", "weight_scale", "input_scale")
#: The block size DeepSeek-V3 and Qwen's FP8 releases use, assumed when no config says.
DEFAULT_BLOCK = (128, 128)


@dataclass(frozen=True)
class Fp8Format:
    """What a checkpoint's ``quantization_config`` says about its FP8 weights."""

    #: ``"fp8"`` (block FP8 with ``weight_scale_inv``) or ``"compressed-tensors"``.
    method: str
    #: Weight block size ``(b0, b1)`` over (out, in), or None (per tensor / per channel).
    block: tuple[int, int] | None = None

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | None) -> "Fp8Format | None":
        """The FP8 format of a ``config.json`` dict; None when its quantization_config (if any)
        is not ``fp8`` or ``compressed-tensors``; an error for compressed-tensors that is not FP8."""
        q = (config or {}).get("quantization_config")
        if not q and "text_config" in (config or {}):
            q = config["text_config"].get("quantization_config")  # type: ignore[index]
        if not q:
            return None
        method = q.get("quant_method")
        if method == "fp8":
            block = q.get("weight_block_size")
            return cls("fp8", tuple(int(b) for b in block) if block else None)  # type: ignore[arg-type]
        if method == "compressed-tensors":
            block = None
            for group in (q.get("config_groups") or {}).values():
                w = (group or {}).get("weights") or {}
                if w.get("type", "float") != "float" or int(w.get("num_bits", 8)) != 8:
                    raise InputError(
                        f"compressed-tensors weights of {w.get('num_bits')} bits, type {w.get('type')}, are not "
                        "FP8; tuckerize reads FP8 (float, 8 bits) and unquantised checkpoints only"
                    )
                if w.get("strategy") == "block" and w.get("block_structure"):
                    block = tuple(int(b) for b in w["block_structure"])
                elif w.get("strategy") == "group" and w.get("group_size"):
                    block = (1, int(w["group_size"]))
            return cls("compressed-tensors", block)  # type: ignore[arg-type]
        return None  # another method: its tensors are not FP8 weights with scales (e.g. quantised factors)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "block": list(self.block) if self.block else None}


def read_format(folder: Path) -> Fp8Format | None:
    """The FP8 format of the checkpoint in ``folder`` (None when unquantised or no config.json)."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        return None
    try:
        return Fp8Format.from_config(json.loads(path.read_text()))
    except json.JSONDecodeError:
        return None  # load_config reports a broken config.json where it is needed


def is_fp8(dtype: str) -> bool:
    """Whether a safetensors dtype string is FP8."""
    return dtype in FP8_DTYPES


def _stem(name: str) -> str:
    """``X.weight`` -> ``X.``; a fused ``X.gate_up_proj`` -> ``X.gate_up_proj_``."""
    return name[: -len("weight")] if name.endswith(".weight") else name + "_"


def companion_names(name: str) -> list[str]:
    """Names of the scale tensors that may be stored beside weight ``name``."""
    stem = _stem(name)
    if name.endswith(".weight"):
        return [stem + s for s in SCALE_SUFFIXES]
    return [stem + "scale_inv", stem + "scale", stem + "input_scale"]


def is_scale_name(name: str) -> bool:
    """Whether ``name`` is a scale tensor (``X.weight_scale_inv``, ``X.weight_scale``,
    ``X.input_scale``, fused ``X.gate_up_proj_scale_inv``...)."""
    return name.endswith(SCALE_SUFFIXES) or name.endswith(("_proj_scale_inv", "_proj_scale"))


def _grid(n: int, b: int) -> int:
    return -(-n // b)


def dequantize(weight, scale, block: tuple[int, int] | None = None, dtype=None):
    """``weight [..., O, I]`` (FP8) times ``scale`` as float32 (or ``dtype``).

    ``scale``: ``[]``/``[1]`` per tensor, ``[..., O, 1]`` or ``[..., O]`` per output
    channel, or ``[..., ceil(O/b0), ceil(I/b1)]`` per block, each entry applying to
    ``block = (b0, b1)`` (the edge blocks partial). Without ``block`` a block grid is
    read with :data:`DEFAULT_BLOCK` when its shape fits, else it is an error.
    """
    import torch

    w = weight.to(torch.float32)
    s = scale.to(w.device, torch.float32)
    O, I = w.shape[-2], w.shape[-1]
    if s.numel() == 1:
        out = w * s.reshape(())
    elif tuple(s.shape[-2:]) == (O, 1):
        out = w * s
    elif s.ndim == w.ndim - 1 and s.shape[-1] == O:
        out = w * s.unsqueeze(-1)
    else:
        if s.ndim != w.ndim:
            raise InputError(f"scale of shape {list(s.shape)} does not fit a weight of shape {list(w.shape)}")
        b0, b1 = block or DEFAULT_BLOCK
        if tuple(s.shape[-2:]) != (_grid(O, b0), _grid(I, b1)):
            raise InputError(
                f"block scale of shape {list(s.shape)} does not fit a weight of shape {list(w.shape)} with blocks "
                f"{b0}x{b1}; check weight_block_size in config.json's quantization_config"
            )
        full = s.repeat_interleave(b0, dim=-2)[..., :O, :].repeat_interleave(b1, dim=-1)[..., :, :I]
        out = w * full
    return out if dtype is None else out.to(dtype)


def dequantize_from(ckpt, name: str, weight, device=None):
    """The FP8 tensor ``weight`` (already read as ``name`` from ``ckpt``) dequantised with
    its scale tensor from the same checkpoint, in float32 on ``device``."""
    scale_name = next((n for n in companion_names(name)[:2] if n in ckpt), None)
    if scale_name is None:
        raise InputError(
            f"{name} is stored in FP8 but its scale ({companion_names(name)[0]} or {companion_names(name)[1]}) "
            f"is not in {ckpt.folder}; is the checkpoint complete?"
        )
    fmt = getattr(ckpt, "fp8", None)
    block = fmt.block if fmt is not None else None
    if weight.device.type == "cpu" and device is not None:
        weight = weight.to(device)
    return dequantize(weight, ckpt.get(scale_name), block)


def source_dtypes(ckpt, names) -> list[str]:
    """The distinct stored dtypes (safetensors strings) of ``names``, sorted."""
    return sorted({ckpt.dtype(n) for n in names})


def element_count(ckpt, names) -> int:
    """Parameters held by ``names``, scale tensors excluded."""
    return sum(math.prod(ckpt.shape(n)) for n in names if not is_scale_name(n))

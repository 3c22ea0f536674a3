"""Packed low-bit storage: asymmetric 2..8-bit codes with float16 scale and zero per group.

The storage of a quantised expert base (and of 2/3-bit factors and cores): a tensor ``X`` of
shape ``S = [*lead, cols]``, groups of ``g`` consecutive values along its last axis
(``g = min(group, cols)``, the last group possibly shorter), ``b`` bits per code, is stored as
four tensors instead of ``X``, keeping its leading axes::

    X.qcodes  uint8    [*lead, ceil(cols * b / 8)]  codes in [0, 2^b - 1], a little-endian bit
                                                    stream per row (code j at bits j*b .. j*b+b-1)
    X.qscale  float16  [*lead, ceil(cols / g)]
    X.qzero   float16  [*lead, ceil(cols / g)]
    X.qshape  int64    [len(S) + 2]                 S, then g, then b

and ``X = (code - zero) * scale`` per group (:mod:`tuckerize.quant_grid`). Each row
starts on a byte, so any leading axis slices like the tensor itself (experts, output rows);
a range of the last axis slices when it starts on a group boundary that is also a byte
boundary (``start * b % 8 == 0``). Bytes: ``rows ceil(cols b / 8) + 4 rows ceil(cols / g) +
8 (len(S) + 3)`` with ``rows = prod(lead)`` (:func:`packed_bytes`), which the manifest counts.

Reading back: :func:`decode` (float32, the whole tensor) or :func:`dequantize_rows` (the rows of
a few experts, what the runtime does per routed expert and call).
"""

from __future__ import annotations

import math
from typing import Mapping

import torch

from tuckerize.errors import InputError

SUFFIXES = (".qcodes", ".qscale", ".qzero", ".qshape")


# -- bits to bytes ------------------------------------------------------------------------------
def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes ``[rows, cols]`` in ``[0, 2^bits - 1]`` -> uint8 ``[rows, ceil(cols bits / 8)]``."""
    rows, cols = codes.shape
    c = codes.to(torch.int64)
    pad = (-cols) % 8
    if pad:
        c = torch.cat([c, c.new_zeros(rows, pad)], 1)
    c = c.view(rows, -1, 8)  # 8 codes = `bits` bytes
    word = (c << (torch.arange(8, dtype=torch.int64, device=c.device) * bits)).sum(-1)  # [rows, n8]
    shifts = torch.arange(bits, dtype=torch.int64, device=c.device) * 8
    out = ((word[..., None] >> shifts) & 0xFF).to(torch.uint8).view(rows, -1)
    return out[:, : math.ceil(cols * bits / 8)].contiguous()


def unpack(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """Inverse of :func:`pack`: uint8 codes ``[rows, cols]``."""
    rows, nbytes = packed.shape
    full = math.ceil(cols / 8) * bits
    p = packed.to(torch.int64)
    if full > nbytes:
        p = torch.cat([p, p.new_zeros(rows, full - nbytes)], 1)
    p = p.view(rows, -1, bits)
    word = (p << (torch.arange(bits, dtype=torch.int64, device=p.device) * 8)).sum(-1)  # [rows, n8]
    shifts = torch.arange(8, dtype=torch.int64, device=p.device) * bits
    c = (word[..., None] >> shifts) & ((1 << bits) - 1)
    return c.view(rows, -1)[:, :cols].to(torch.uint8)


# -- the layout -----------------------------------------------------------------------------------
def encode(name: str, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
           group: int) -> dict[str, torch.Tensor]:
    """The stored tensors of ``X`` (shape ``codes.shape``) from its codes and its per-group
    ``scale``/``zero`` ``[*codes.shape[:-1], n_groups]`` (e.g.
    :class:`tuckerize.decompose.factor_quant.StoredCodes`)."""
    shape = list(codes.shape)
    cols = shape[-1]
    g = min(group, cols)
    m = codes.reshape(-1, cols)
    if m.numel() and (float(m.min()) < 0 or float(m.max()) > (1 << bits) - 1):
        raise ValueError(f"codes of {name} fall outside [0, {(1 << bits) - 1}] for {bits} bits")
    n = math.ceil(cols / g)
    lead = shape[:-1]
    return {f"{name}.qcodes": pack(m, bits).reshape(*lead, -1),
            f"{name}.qscale": scale.reshape(*lead, n).to(torch.float16).contiguous(),
            f"{name}.qzero": zero.reshape(*lead, n).to(torch.float16).contiguous(),
            f"{name}.qshape": torch.tensor([*shape, g, bits], dtype=torch.int64)}


def layout_of(stored: Mapping[str, torch.Tensor], name: str) -> tuple[list[int], int, int]:
    """``(shape, group, bits)`` of ``name`` from its ``.qshape``; a damaged layout is an error."""
    meta = [int(v) for v in stored[f"{name}.qshape"].tolist()]
    if len(meta) < 3:
        raise InputError(f"{name}.qshape has {len(meta)} values (shape, group, bits expected); "
                         "the checkpoint is damaged: decompose again")
    *shape, g, bits = meta
    if not 1 <= bits <= 8 or g < 1:
        raise InputError(f"{name}.qshape says {bits} bits in groups of {g}; the checkpoint is damaged: decompose again")
    return shape, g, bits


def dequantize_rows(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group: int,
                    cols: int, dtype=torch.float32) -> torch.Tensor:
    """Packed rows ``[*lead, nbytes]`` with their ``scale``/``zero`` ``[*lead, n_groups]`` ->
    ``[*lead, cols]`` in ``dtype``: what the runtime does for the experts a call touches."""
    lead = codes.shape[:-1]
    rows = math.prod(lead)
    if rows == 0 or cols == 0:  # an empty slice (a rank that holds none of this axis)
        return torch.zeros(*lead, cols, dtype=dtype, device=codes.device)
    codes, scale, zero = codes.reshape(rows, -1), scale.reshape(rows, -1), zero.reshape(rows, -1)
    q = unpack(codes, bits, cols).to(dtype)
    n = scale.shape[-1]
    g = group
    pad = n * g - cols
    if pad:
        q = torch.cat([q, q.new_zeros(q.shape[0], pad)], 1)
    q = q.view(q.shape[0], n, g)
    out = (q - zero.to(dtype)[..., None]) * scale.to(dtype)[..., None]
    return out.view(q.shape[0], -1)[:, :cols].reshape(*lead, cols)


def decode(stored: Mapping[str, torch.Tensor], name: str) -> torch.Tensor:
    """``name`` as float32 from the tensors :func:`encode` wrote."""
    shape, g, bits = layout_of(stored, name)
    codes, scale, zero = stored[f"{name}.qcodes"], stored[f"{name}.qscale"], stored[f"{name}.qzero"]
    if codes.dtype != torch.uint8:
        raise InputError(f"{name}.qcodes has dtype {codes.dtype}, not uint8; the checkpoint is damaged: decompose again")
    return dequantize_rows(codes, scale, zero, bits, g, shape[-1]).reshape(shape).contiguous()


def packed_bytes(shape, bits: int, group: int) -> int:
    """Stored bytes of a tensor of ``shape`` in this layout (codes, scales, zeros, ``qshape``)."""
    cols = int(shape[-1])
    rows = math.prod(int(s) for s in shape[:-1]) if len(shape) > 1 else 1
    g = min(group, cols)
    return rows * math.ceil(cols * bits / 8) + rows * math.ceil(cols / g) * 4 + 8 * (len(shape) + 2)


def slice_stored(stored: Mapping[str, torch.Tensor], name: str, axis: int, rows: "torch.Tensor | None" = None,
                 start: int = 0, stop: int = 0) -> dict[str, torch.Tensor] | None:
    """The stored tensors of a slice of ``name`` along ``axis`` without unpacking, or None
    where the slice cuts through a group or a byte (then decode and slice instead).

    Any axis but the last slices codes, scales and zeros alike (``rows``: the listed
    indices along ``axis``, else ``[start, stop)``); the last axis slices ``[start, stop)``
    when ``start`` is a multiple of the group size with ``start * bits % 8 == 0`` and
    ``stop`` is one too or the end."""
    shape, g, bits = layout_of(stored, name)
    codes, scale, zero = stored[f"{name}.qcodes"], stored[f"{name}.qscale"], stored[f"{name}.qzero"]
    last = len(shape) - 1
    if axis < 0 or axis > last:
        return None
    if axis < last:
        index = rows if rows is not None else torch.arange(start, stop)
        codes, scale, zero = (t.index_select(axis, index.to(torch.int64)) for t in (codes, scale, zero))
        new_shape = list(shape)
        new_shape[axis] = len(index)
    else:
        cols = shape[-1]
        if rows is not None or start % g or (start * bits) % 8 or (stop != cols and (stop % g or (stop * bits) % 8)):
            return None
        codes = codes[..., start * bits // 8 : math.ceil(stop * bits / 8)]
        scale, zero = scale[..., start // g : math.ceil(stop / g)], zero[..., start // g : math.ceil(stop / g)]
        new_shape = [*shape[:-1], stop - start]
        g = min(g, stop - start) if stop > start else g  # an empty slice keeps its group
    return {f"{name}.qcodes": codes.contiguous(), f"{name}.qscale": scale.contiguous(),
            f"{name}.qzero": zero.contiguous(), f"{name}.qshape": torch.tensor([*new_shape, g, bits], dtype=torch.int64)}


def is_packed(keys, name: str) -> bool:
    return f"{name}.qcodes" in keys


__all__ = ["SUFFIXES", "pack", "unpack", "encode", "decode", "dequantize_rows", "layout_of", "packed_bytes",
           "slice_stored", "is_packed"]

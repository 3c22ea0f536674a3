"""Quantised storage of Tucker factors and cores: the maths, the on-disk layout, bytes.

Owns: group-wise round-to-nearest quantisation (``int8``, ``int4``, ``fp8`` e4m3) and its
inverse, the safetensors layout of a quantised tensor, reading one back (the loaders call
:func:`read_dequantised` when a factor is stored quantised), rewriting a finished Tucker
projection's factors as ``tuckerize decompose --factor-dtype`` writes them
(:func:`encode_projection`, a stage of the decompose pipeline) with the core refitted to the
quantised orthonormal factors, and byte counts (:func:`factor_bytes`).

Layout (format version 2). A tensor ``X`` of shape ``S`` (``U_E [E, r_E]``, ``U_H [H, r_H]``,
``U_I [I, r_I]``, ``core [r_E, r_H, r_I]``) is viewed as a matrix ``[rows, cols]`` with
``cols = S[-1]`` and ``rows = prod(S[:-1])``, cut along ``cols`` into groups of ``g``
consecutive values (``g = min(group, cols)``, the last group possibly shorter), and stored as
three tensors instead of ``X``::

    X.qweight   int8    [rows, cols]           int8 codes in [-127, 127]
                uint8   [rows, ceil(cols/2)]   int4 codes in [-7, 7] + 8, two per byte,
                                               element 2j in the low nibble, 2j+1 in the high
                F8_E4M3 [rows, cols]           fp8 e4m3 values
    X.qscale    float16 [rows, ceil(cols/g)]   one scale per group (symmetric: no zero point)
    X.qshape    int64   [len(S) + 1]           S, then g

and ``X = codes * scale`` (per group), returned as float32. The code type is read from
``qweight``'s dtype, so a reader needs nothing else. ``bf16`` and ``fp16`` store ``X`` itself
as bfloat16 / float16; ``float32`` (format version 1) as float32. Which dtype a decomposition
stores by default is the source checkpoint's (:meth:`tuckerize.compress.source.SourceModel.factor_dtype`). Checkpoints without any
``.qweight`` tensor are read exactly as before.

``int3`` and ``int2`` are asymmetric (float16 scale and zero per group) and packed
(``X.qcodes/.qscale/.qzero/.qshape``, :mod:`tuckerize.quant_packed`, the storage of a
quantised expert base too); every reader here (:func:`decode`, :func:`slice_stored`,
:func:`is_quantised`, :func:`logical_names`) takes both layouts.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch

from tuckerize import quant_packed
from tuckerize.quant_grid import Grid, round_to_grid
from tuckerize.errors import InputError

FACTOR_KINDS = ("U_E", "U_H", "U_I", "core")
DTYPES = ("float32", "bf16", "fp16", "fp8", "int8", "int4", "int3", "int2")
#: Stored as the tensor itself (no codes and scales), with its torch dtype.
PLAIN = {"float32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
QUANTISED = ("fp8", "int8", "int4")
#: Asymmetric packed dtypes (:mod:`tuckerize.quant_packed`) and their bits.
PACKED = {"int3": 3, "int2": 2}
DEFAULT_GROUP = 128
SUFFIXES = (".qweight", ".qscale", ".qshape")
_QMAX = {"int8": 127.0, "int4": 7.0, "fp8": 448.0}
_BITS = {"float32": 32, "bf16": 16, "fp16": 16, "fp8": 8, "int8": 8, "int4": 4, "int3": 3, "int2": 2}
SCALE_BYTES = 2  # float16


# -- the maths --------------------------------------------------------------------------------
def _as_matrix(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]) if x.dim() > 1 else x.reshape(1, -1)


def group_view(m: torch.Tensor, group: int) -> tuple[torch.Tensor, int]:
    """``m [rows, cols]`` padded with zeros to ``[rows, n, g]``; returns it and ``g``."""
    rows, cols = m.shape
    g = min(group, cols)
    n = math.ceil(cols / g)
    pad = n * g - cols
    if pad:
        m = torch.cat([m, m.new_zeros(rows, pad)], 1)
    return m.view(rows, n, g), g


def quantize(x: torch.Tensor, dtype: str, group: int = DEFAULT_GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric round-to-nearest, one float16 scale per group of ``group`` values along the
    last axis. Returns ``(codes [rows, cols] (int8 or float8_e4m3fn), scales [rows, n_groups])``;
    int4 codes are int8 in [-7, 7] here (packed by :func:`pack_int4` for storage)."""
    if dtype not in QUANTISED:
        raise InputError(f"factor dtype {dtype} is not one of {', '.join(QUANTISED)}")
    m = _as_matrix(x.float())
    rows, cols = m.shape
    grouped, g = group_view(m, group)
    amax = grouped.abs().amax(-1)
    scale = (amax / _QMAX[dtype]).to(torch.float16)
    # a zero group keeps scale 0 (codes 0); scales below float16's range are kept at its minimum
    scale = torch.where((amax > 0) & (scale == 0), torch.tensor(torch.finfo(torch.float16).tiny, dtype=torch.float16),
                        scale)
    s = scale.float().clamp_min(1e-30)[..., None]
    q = grouped / s
    if dtype == "fp8":
        codes = q.clamp(-448, 448).to(torch.float8_e4m3fn)
    else:
        codes = torch.round(q).clamp(-_QMAX[dtype], _QMAX[dtype]).to(torch.int8)
    return codes.view(rows, -1)[:, :cols].contiguous(), scale


def dequantize(codes: torch.Tensor, scale: torch.Tensor, shape: tuple[int, ...] | list[int],
               group: int | None = None) -> torch.Tensor:
    """Inverse of :func:`quantize`: float32 tensor of ``shape``; ``group`` as quantised
    (default: ``ceil(cols / n_groups)``, right when ``cols`` is a multiple of the group)."""
    rows, cols = codes.shape
    n = scale.shape[-1]
    g = group or math.ceil(cols / n)
    grouped, _ = group_view(codes.float(), g)
    out = (grouped * scale.float()[..., None]).reshape(rows, grouped.shape[1] * grouped.shape[2])[:, :cols]
    return out.reshape(tuple(shape)).contiguous()


def fake_quantize(x: torch.Tensor, dtype: str, group: int = DEFAULT_GROUP) -> torch.Tensor:
    """``dequantize(quantize(x))``: what a reader of the stored tensor gets back (float32)."""
    if dtype in PLAIN:
        return x.to(PLAIN[dtype]).float()
    if dtype in PACKED:
        return decode(encode("x", x, dtype, group), "x")
    codes, scale = quantize(x, dtype, group)
    return dequantize(codes, scale, tuple(x.shape), min(group, x.shape[-1]))


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """int8 codes in [-7, 7] ``[rows, cols]`` -> uint8 ``[rows, ceil(cols/2)]`` (low nibble first)."""
    u = (codes.to(torch.int16) + 8).to(torch.uint8)
    if u.shape[1] % 2:
        u = torch.cat([u, torch.full((u.shape[0], 1), 8, dtype=torch.uint8)], 1)
    return (u[:, 0::2] | (u[:, 1::2] << 4)).contiguous()


def unpack_int4(packed: torch.Tensor, cols: int) -> torch.Tensor:
    lo = (packed & 0x0F).to(torch.int8) - 8
    hi = (packed >> 4).to(torch.int8) - 8
    return torch.stack([lo, hi], -1).view(packed.shape[0], 2 * packed.shape[1])[:, :cols]


# -- the layout -------------------------------------------------------------------------------
def encode(name: str, x: torch.Tensor, dtype: str, group: int = DEFAULT_GROUP) -> dict[str, torch.Tensor]:
    """The stored tensors of ``x`` under ``name`` for ``dtype`` (see the module docstring)."""
    if dtype in PLAIN:
        return {name: x.to(PLAIN[dtype]).contiguous()}
    if dtype in PACKED:
        return _encode_packed(name, x, PACKED[dtype], group)
    codes, scale = quantize(x, dtype, group)
    if dtype == "int4":
        codes = pack_int4(codes)
    return {f"{name}.qweight": codes, f"{name}.qscale": scale.contiguous(),
            f"{name}.qshape": torch.tensor([*x.shape, min(group, x.shape[-1])], dtype=torch.int64)}


def _encode_packed(name: str, x: torch.Tensor, bits: int, group: int) -> dict[str, torch.Tensor]:
    """Round to nearest on the asymmetric clipped grid, packed (:mod:`tuckerize.quant_packed`)."""
    codes, scale, zero, _ = round_to_grid(x.float(), Grid(bits=bits, group=group))
    return quant_packed.encode(name, codes, scale, zero, bits, group)


def encode_codes(name: str, q: Any, dtype: str) -> dict[str, torch.Tensor]:
    """The stored tensors of codes already chosen on a grid (e.g. by GPTQ:
    :class:`tuckerize.decompose.factor_quant.StoredCodes` ``q``, in the tensor's own layout,
    groups along its last axis) for ``dtype``: ``int8``/``int4`` (symmetric grids) or
    ``int3``/``int2`` (asymmetric, packed)."""
    shape = list(q.codes.shape)
    g = min(q.grid.group, shape[-1])
    if dtype in PACKED:
        if q.grid.symmetric or q.grid.bits != PACKED[dtype]:
            raise ValueError(f"{name}: {dtype} stores asymmetric {PACKED[dtype]}-bit codes, not {q.grid}")
        return quant_packed.encode(name, q.codes, q.scale, q.zero, q.grid.bits, q.grid.group)
    if dtype not in ("int8", "int4") or not q.grid.symmetric or q.grid.qmax != _QMAX[dtype]:
        raise ValueError(f"{name}: {dtype} stores symmetric codes in [-{_QMAX.get(dtype)}, {_QMAX.get(dtype)}], not {q.grid}")
    codes = q.codes.reshape(-1, shape[-1]).round().to(torch.int8)
    if dtype == "int4":
        codes = pack_int4(codes)
    return {f"{name}.qweight": codes.contiguous(), f"{name}.qscale": q.scale.reshape(codes.shape[0], -1).to(torch.float16).contiguous(),
            f"{name}.qshape": torch.tensor([*shape, g], dtype=torch.int64)}


def decode(stored: Mapping[str, torch.Tensor], name: str) -> torch.Tensor:
    """``name`` as float32 from the tensors :func:`encode` wrote (quantised or not, either layout)."""
    if name in stored:
        return stored[name].float()
    if f"{name}.qcodes" in stored:
        return quant_packed.decode(stored, name)
    codes, scale = stored[f"{name}.qweight"], stored[f"{name}.qscale"]
    *shape, group = [int(v) for v in stored[f"{name}.qshape"].tolist()]
    cols = shape[-1]
    if codes.dtype == torch.uint8:
        codes = unpack_int4(codes, cols)
    elif codes.dtype not in (torch.int8, torch.float8_e4m3fn):
        raise InputError(f"{name}.qweight has dtype {codes.dtype}, not int8, uint8 (int4) or float8_e4m3fn; "
                         "the checkpoint is damaged: decompose again")
    return dequantize(codes, scale, shape, group)


def slice_stored(stored: Mapping[str, torch.Tensor], name: str, axis: int, rows: "torch.Tensor | None" = None,
                 start: int = 0, stop: int = 0) -> dict[str, torch.Tensor] | None:
    """The stored (quantised) tensors of a slice of ``name`` without dequantising, or None
    where the slice cuts through the storage (then dequantise and slice instead).

    ``axis`` 0 of a tensor of two or more axes is a block of whole rows of the matrix view
    (``rows``: the listed indices, else ``[start, stop)``), so codes and scales are sliced
    by rows. The last axis is cut along the groups: possible when ``start`` is a multiple
    of the group size and ``stop`` is one too, or the end (int4 codes also need ``start``
    even: two codes per byte). Other axes: None. Packed tensors: :func:`tuckerize.quant_packed.slice_stored`."""
    if f"{name}.qcodes" in stored:
        return quant_packed.slice_stored(stored, name, axis, rows=rows, start=start, stop=stop)
    codes, scale = stored[f"{name}.qweight"], stored[f"{name}.qscale"]
    *shape, g = [int(v) for v in stored[f"{name}.qshape"].tolist()]
    if len(shape) < 2 or axis not in (0, len(shape) - 1):
        return None
    per = math.prod(shape[1:-1])  # matrix rows per index along axis 0
    if axis == 0:
        index = rows if rows is not None else torch.arange(start, stop)
        row_index = (index.view(-1, 1) * per + torch.arange(per).view(1, -1)).reshape(-1)
        new_shape = [len(index), *shape[1:]]
        codes, scale = codes.index_select(0, row_index), scale.index_select(0, row_index)
    else:
        cols = shape[-1]
        if rows is not None or start % g or (stop % g and stop != cols) or (codes.dtype == torch.uint8 and start % 2):
            return None
        if codes.dtype == torch.uint8:
            codes = codes[:, start // 2 : (stop + 1) // 2]
        else:
            codes = codes[:, start:stop]
        scale = scale[:, start // g : math.ceil(stop / g)]
        new_shape = [*shape[:-1], stop - start]
        g = min(g, stop - start)
    return {f"{name}.qweight": codes.contiguous(), f"{name}.qscale": scale.contiguous(),
            f"{name}.qshape": torch.tensor([*new_shape, g], dtype=torch.int64)}


def is_quantised(keys, name: str) -> bool:
    """``name`` is stored quantised (either layout) among the tensor names ``keys``."""
    return f"{name}.qweight" in keys or f"{name}.qcodes" in keys


def stored_suffixes(keys, name: str) -> tuple[str, ...]:
    """The suffixes of the tensors that store quantised ``name`` (either layout)."""
    return quant_packed.SUFFIXES if f"{name}.qcodes" in keys else SUFFIXES


def stored_shape(stored: Mapping[str, torch.Tensor], name: str) -> list[int]:
    """The logical shape of quantised ``name`` from its ``.qshape``."""
    meta = [int(v) for v in stored[f"{name}.qshape"].tolist()]
    return meta[:-2] if f"{name}.qcodes" in stored else meta[:-1]


def read_stored(ckpt: Any, name: str) -> dict[str, torch.Tensor]:
    """The stored tensors of quantised ``name`` from a :class:`~tuckerize.checkpoint.Checkpoint`."""
    return {f"{name}{s}": ckpt.get(f"{name}{s}") for s in stored_suffixes(ckpt.weight_map, name)}


def read_dequantised(ckpt: Any, name: str) -> torch.Tensor:
    """``name`` from a :class:`~tuckerize.checkpoint.Checkpoint` where it is stored quantised."""
    return decode(read_stored(ckpt, name), name)


# -- per-factor choice --------------------------------------------------------------------------
def parse_factor_dtype(spec: str, default: str = "float32") -> dict[str, str]:
    """``"int8"`` (every factor) or ``"int8,core=int4"`` / ``"U_E=bf16,U_H=int8,U_I=int8,core=int4"``
    (a default first, then per-factor overrides) -> ``{factor: dtype}`` for U_E, U_H, U_I, core;
    factors the spec leaves out (``"core=int4"``) take ``default`` (the decomposition passes
    the source's dtype)."""
    out: dict[str, str] = {}
    default_given = None
    for part in [p.strip() for p in spec.split(",") if p.strip()]:
        key, _, value = part.partition("=")
        if not value:
            key, value = "", key
        if value not in DTYPES:
            raise InputError(f"--factor-dtype {spec}: '{value}' is not one of {', '.join(DTYPES)}")
        if not key:
            default_given = value
        elif key in FACTOR_KINDS:
            out[key] = value
        else:
            raise InputError(f"--factor-dtype {spec}: '{key}' is not one of {', '.join(FACTOR_KINDS)}")
    if default_given is None:
        default_given = default
    return {f: out.get(f, default_given) for f in FACTOR_KINDS}


# -- bytes --------------------------------------------------------------------------------------
def tensor_bytes(shape: tuple[int, ...] | list[int], dtype: str, group: int = DEFAULT_GROUP) -> int:
    """Stored bytes of a tensor of ``shape`` in ``dtype`` (codes + float16 scales; the
    ``qshape`` (8 bytes per axis, plus 8) is counted too)."""
    cols = shape[-1]
    rows = math.prod(shape[:-1]) if len(shape) > 1 else 1
    if dtype in PACKED:
        return quant_packed.packed_bytes(shape, PACKED[dtype], group)
    if dtype in PLAIN:
        return rows * cols * _BITS[dtype] // 8
    g = min(group, cols)
    codes = rows * (math.ceil(cols / 2) if dtype == "int4" else cols)
    return codes + rows * math.ceil(cols / g) * SCALE_BYTES + 8 * (len(shape) + 1)


def factor_shapes(shape: tuple[int, int, int], ranks: tuple[int, int, int]) -> dict[str, tuple[int, ...]]:
    (E, H, I), (rE, rH, rI) = shape, ranks
    return {"U_E": (E, rE), "U_H": (H, rH), "U_I": (I, rI), "core": (rE, rH, rI)}


def factor_bytes(shape: tuple[int, int, int], ranks: tuple[int, int, int], dtypes: Mapping[str, str],
                 group: int = DEFAULT_GROUP) -> int:
    """Stored bytes of one projection's factors and core."""
    return sum(tensor_bytes(s, dtypes[f], group) for f, s in factor_shapes(shape, ranks).items())


def refit_core(core: torch.Tensor, exact: Mapping[str, torch.Tensor], quantised: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The core that makes ``core' x Q_E x Q_H x Q_I`` closest (Frobenius) to the unquantised
    ``core x U_E x U_H x U_I``, for quantised factors ``Q``: ``core' = core x_n (Q_n^+ U_n)``
    (float64; ``r x r`` products only, never the expert tensor)."""
    c = core.double()
    mats = []
    for f in ("U_E", "U_H", "U_I"):
        q, u = quantised[f].double(), exact[f].double()
        mats.append(torch.linalg.lstsq(q, u).solution)  # Q^+ U  [r, r]
    c = torch.einsum("abc,xa,yb,zc->xyz", c, *mats)
    return c.float()


def quantize_factors(factors: Mapping[str, torch.Tensor], dtypes: Mapping[str, str], group: int = DEFAULT_GROUP,
                     refit: bool = True) -> dict[str, torch.Tensor]:
    """One projection's factors ``{U_E, U_H, U_I, core}`` as a reader of the stored checkpoint
    gets them back; with ``refit`` the core is refitted (:func:`refit_core`) to the quantised
    orthonormal factors before it is quantised itself."""
    q = {f: fake_quantize(factors[f], dtypes[f], group) for f in ("U_E", "U_H", "U_I")}
    core = factors["core"].float()
    if refit and any(dtypes[f] in QUANTISED for f in ("U_E", "U_H", "U_I")):
        core = refit_core(core, factors, q)
    q["core"] = core
    return q


# -- a projection as the decompose pipeline writes it ---------------------------------------------
def storage(dtypes: Mapping[str, str] | None, group: int = DEFAULT_GROUP, refit: bool = True) -> dict[str, Any] | None:
    """The config's and manifest's ``factor_storage`` entry, or None for plain float32 factors."""
    if dtypes is None or set(dtypes.values()) == {"float32"}:
        return None
    return {"dtypes": dict(dtypes), "group_size": group, "core_refit": refit}


def encode_projection(names: Mapping[str, str], factors: Mapping[str, torch.Tensor],
                      factor_storage: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The stored tensors of one projection's factors ``{U_E, U_H, U_I, core}`` (``names``:
    factor -> tensor name) under ``factor_storage`` (:func:`storage`): each orthonormal factor
    quantised, the core refitted to them (``core_refit``) and then quantised itself."""
    dtypes, group = factor_storage["dtypes"], int(factor_storage["group_size"])
    exact = {f: factors[f].float() for f in FACTOR_KINDS}
    q = quantize_factors(exact, dtypes, group, bool(factor_storage["core_refit"]))
    out: dict[str, torch.Tensor] = {}
    for f, n in names.items():  # U's are encoded from the exact values (q holds their round trip)
        out.update(encode(n, exact[f] if f != "core" else q["core"], dtypes[f], group))
    return out


def checkpoint_bytes(spec, layers: Mapping[int, Mapping[str, Any]], dtypes: Mapping[str, str] | None = None,
                     group: int = DEFAULT_GROUP) -> dict[str, Any]:
    """Expert bytes of a Tucker checkpoint against bf16 dense experts (the manifest's ``bytes``)."""
    dtypes = dtypes or {f: "float32" for f in FACTOR_KINDS}
    E, H, I = spec.shape
    dense = 3 * E * H * I * 2 * len(layers)
    stored = sum(factor_bytes(spec.shape, tuple(entry[p]["ranks"]), dtypes, group)
                 for entry in layers.values() for p in ("gate", "up", "down"))
    as_bf16 = sum(factor_bytes(spec.shape, tuple(entry[p]["ranks"]), {f: "bf16" for f in FACTOR_KINDS})
                  for entry in layers.values() for p in ("gate", "up", "down"))
    return {"experts_dense_bf16": dense, "experts_stored": stored, "experts_factors_as_bf16": as_bf16,
            "ratio_to_bf16_dense": stored / dense, "dtypes": dict(dtypes), "group_size": group}


def logical_names(names) -> list[str]:
    """Tensor names with each quantised set (``X.qweight/.qscale/.qshape``, packed
    ``X.qcodes/.qscale/.qzero/.qshape``) replaced by ``X``."""
    out = []
    for n in names:
        if n.endswith((".qweight", ".qcodes")):
            out.append(n.rsplit(".", 1)[0])
        elif not n.endswith((".qscale", ".qshape", ".qzero")):
            out.append(n)
    return out

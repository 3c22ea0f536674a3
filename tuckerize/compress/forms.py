"""The stored forms of one projection under a byte budget: candidates with estimated errors,
and the chosen one computed and encoded.

:func:`projection_options` lists the
candidate :class:`~tuckerize.allocate_bytes.Option` s of one stacked projection ``T [E, H, I]``
with their exact stored bytes and estimated relative output errors
(:mod:`tuckerize.decompose.estimate`; the base by GPTQ with the statistics, measured).
:func:`realise` computes the chosen option and returns the tensors to write:

* ``tucker``: the per-expert weighted Tucker of the run's strategy, then the factors and
  cores quantised by GPTQ with the weighted core refit
  (:func:`tuckerize.decompose.factor_quant.quantise_tucker`); ``U_E`` (the identity) in bf16;
* ``base``: GPTQ of every expert (gate/up: the routed hidden covariance; down: each expert's
  own down-input covariance), packed (:mod:`tuckerize.quant_packed`) as ``<prefix>.<p>.base``;
* ``base+tucker``: the alternation of :mod:`tuckerize.decompose.residual`, both encoded.

The settings (which forms, bits, groups, storages, the rank grid, the residual fit) are
:class:`tuckerize.compress.method.BytesMethod`, the config's ``method: bytes:``.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch

from tuckerize.allocate_bytes import Option
from tuckerize.compress.method import BytesMethod
from tuckerize.errors import RankError

#: Storage of every factor of a Tucker part: U_E is the identity (r_E = E), kept exact in bf16.
U_E_DTYPE = "bf16"


def storage_dtypes(storage: str) -> dict[str, str]:
    """``"int8,core=int4"`` -> per-factor dtypes with ``U_E`` bf16 (:data:`U_E_DTYPE`)."""
    from tuckerize.quant import parse_factor_dtype

    return {**parse_factor_dtype(storage), "U_E": U_E_DTYPE}


def tucker_bytes(shape, rH: int, rI: int, storage: str, group: int = 128) -> int:
    from tuckerize.quant import factor_bytes

    E = shape[0]
    return factor_bytes(tuple(shape), (E, rH, rI), storage_dtypes(storage), group)


def base_shape(shape, proj: str) -> tuple[int, int, int]:
    """The stored base ``[E, out, in]``: gate/up ``[E, I, H]``, down ``[E, H, I]``."""
    E, H, I = shape
    return (E, H, I) if proj == "down" else (E, I, H)


def base_bytes(shape, proj: str, bits: int, group: int) -> int:
    from tuckerize.quant_packed import packed_bytes

    return packed_bytes(base_shape(shape, proj), bits, group)


def rank_grid(dim: int, steps: int) -> list[int]:
    """Ranks tried for a mode of size ``dim``: about ``steps`` values up to ``dim``
    (multiples of 8 above 256, as :func:`tuckerize.allocate.default_step`)."""
    step = max(1, dim // steps)
    if dim > 256:
        step = max(8, step - step % 8)
    return sorted({min(dim, r) for r in range(step, dim + step, step)})


def _grids(dtypes: Mapping[str, str]):
    from tuckerize.quant_grid import Grid
    from tuckerize.quant import PACKED

    out = {}
    for f in ("U_H", "U_I", "core"):
        d = dtypes[f]
        if d in PACKED:
            out[f] = Grid(bits=PACKED[d], group=128)
        elif d in ("int8", "int4"):
            out[f] = Grid(bits=int(d[3:]), group=128, symmetric=True)
        elif d in ("bf16", "float32"):
            out[f] = None
        else:
            raise RankError(f"factor storage {d} has no integer grid for the calibrated quantiser; use int8, int4, "
                            "int3, int2 or bf16")
    return out


def _noise(dtypes: Mapping[str, str]) -> float:
    from tuckerize.decompose.estimate import grid_noise

    return sum(grid_noise(g) for g in _grids(dtypes).values() if g is not None)


def _base_cov(layer_stats: Mapping[str, torch.Tensor], proj: str) -> torch.Tensor:
    """The covariance a base is quantised with (unridged; GPTQ adds its own)."""
    return layer_stats["inter_expert" if proj == "down" else "hidden_routed"].to(torch.float64)


def _gptq_base(T: torch.Tensor, layer_stats, proj: str, bits: int, group: int, damp: float):
    from tuckerize.decompose.gptq import gptq
    from tuckerize.quant_grid import Grid
    from tuckerize.decompose.residual import base_orientation

    to_s, from_s = base_orientation("I" if proj == "down" else "H")
    q = gptq(to_s(T).contiguous(), _base_cov(layer_stats, proj).to(T.device), Grid(bits, group),
             damp=damp)
    return q, from_s(q.weight)


def smallest_bytes(shape, proj: str, method: BytesMethod) -> int:
    """The bytes of the cheapest candidate of :func:`projection_options` for a projection of
    ``shape`` (known from the shapes alone: a budget below their sum is refused before any work)."""
    E, H, I = shape
    rH, rI = rank_grid(H, method.rank_steps)[0], rank_grid(I, method.rank_steps)[0]
    sizes = []
    if "tucker" in method.forms:
        sizes += [tucker_bytes(shape, rH, rI, s) for s in method.tucker_storages]
    if "base" in method.forms:
        sizes += [base_bytes(shape, proj, b, g) for b in method.base_bits for g in method.base_groups]
    if "base+tucker" in method.forms:
        sizes += [base_bytes(shape, proj, b, g) + tucker_bytes(shape, rH, rI, method.residual_storage)
                  for b in method.base_bits for g in method.base_groups]
    return min(sizes)


def projection_options(T: torch.Tensor, layer_stats: Mapping[str, torch.Tensor], proj: str, method: BytesMethod,
                       metric_weights) -> list[Option]:
    """The candidate forms of one projection ``T [E, H, I]`` (float32/64; module docstring).
    ``metric_weights``: the mode whitenings of the error metric
    (:func:`tuckerize.calibration.weights.mode_weights`)."""
    from tuckerize.decompose.estimate import energy_table
    from tuckerize.decompose.whiten import whiten

    E, H, I = T.shape
    T32 = T.to(torch.float32)  # the candidates in float32 (12 GPTQ runs per projection); the chosen one in float64
    Tw = whiten(T32, metric_weights)
    total = float((Tw.double() ** 2).sum()) or 1.0
    rH_grid, rI_grid = rank_grid(H, method.rank_steps), rank_grid(I, method.rank_steps)
    out: list[Option] = []
    if "tucker" in method.forms:
        kept = energy_table(Tw)
        for storage in method.tucker_storages:
            noise = _noise(storage_dtypes(storage))
            for rH in rH_grid:
                for rI in rI_grid:
                    k = float(kept[rH, rI])
                    out.append(Option("tucker", tucker_bytes(T.shape, rH, rI, storage),
                                      (total - k + noise * k) / total, ranks=(E, rH, rI), storage=storage))
    if "base" in method.forms or "base+tucker" in method.forms:
        noise = _noise(storage_dtypes(method.residual_storage))
        for bits in method.base_bits:
            for group in method.base_groups:
                _, Q = _gptq_base(T32, layer_stats, proj, bits, group, method.gptq_damp)
                Rw = whiten(T32 - Q, metric_weights)
                err = float((Rw.double() ** 2).sum())
                nb = base_bytes(T.shape, proj, bits, group)
                if "base" in method.forms:
                    out.append(Option("base", nb, err / total, base=(bits, group)))
                if "base+tucker" in method.forms:
                    hmax, imax = max(1, int(method.residual_max * H)), max(1, int(method.residual_max * I))
                    kept = energy_table(Rw, (hmax, imax))
                    for rH in [r for r in rH_grid if r <= hmax]:
                        for rI in [r for r in rI_grid if r <= imax]:
                            k = float(kept[rH, rI])
                            out.append(Option("base+tucker", nb + tucker_bytes(T.shape, rH, rI, method.residual_storage),
                                              (err - k + noise * k) / total, ranks=(E, rH, rI), base=(bits, group),
                                              storage=method.residual_storage))
    return out


# ------------------------------------------------------------------------------- realise
def _encode_tucker(names: Mapping[str, str], quantised, dtypes: Mapping[str, str]) -> dict[str, torch.Tensor]:
    from tuckerize.quant import encode, encode_codes

    out: dict[str, torch.Tensor] = {}
    for f, n in names.items():
        if f in quantised.stored:
            out.update(encode_codes(n, quantised.stored[f], dtypes[f]))
        else:
            out.update(encode(n, quantised.factors[f].float(), dtypes[f]))
    return out


def realise(T: torch.Tensor, option: Option, *, proj: str, layer_stats, A, B, decompose_tucker,
            names: Mapping[str, str], base_name: str, method: BytesMethod) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors of ``option`` for projection ``proj`` of ``T [E, H, I]`` and its record.

    ``A``, ``B``: the two-sided weights (:func:`tuckerize.calibration.weights.expert_weights`);
    ``decompose_tucker(T, ranks)``: the run's weighted Tucker (a
    :class:`~tuckerize.decompose.TuckerTensor`); ``names``: factor -> tensor name;
    ``base_name``: the base's logical name."""
    from tuckerize.decompose import TuckerTensor
    from tuckerize.decompose.expert_weighted import weighted_objective
    from tuckerize.decompose.factor_quant import quantise_tucker, stored_codes
    from tuckerize.quant_grid import Grid
    from tuckerize.decompose.residual import fit_quantised
    from tuckerize.quant_packed import encode as encode_packed

    side = "I" if proj == "down" else "H"
    T64 = T.to(torch.float64)
    tensors: dict[str, torch.Tensor] = {}
    recon = None
    if option.form == "base":
        q, recon = _gptq_base(T64, layer_stats, proj, option.base[0], option.base[1], method.gptq_damp)
        s = stored_codes(q, transposed=False)
        tensors.update(encode_packed(base_name, s.codes, s.scale, s.zero, option.base[0], option.base[1]))
    elif option.form == "tucker":
        dtypes = storage_dtypes(option.storage)
        res = decompose_tucker(T, option.ranks)
        qt = quantise_tucker(T64, res.factors, res.core, A, B, _grids(dtypes), side=side, damp=method.gptq_damp)
        tensors.update(_encode_tucker(names, qt, dtypes))
        f = qt.factors
        recon = TuckerTensor(core=f["core"], factors=[f["U_E"], f["U_H"], f["U_I"]]).to_tensor()
    else:
        dtypes = storage_dtypes(option.storage)
        bits, group = option.base
        out = fit_quantised(T64, option.ranks, A, B, Grid(bits, group), _grids(dtypes), side=side,
                            rounds=method.residual_rounds, init=method.residual_init, damp=method.gptq_damp,
                            base_cov=_base_cov(layer_stats, proj).to(T.device))
        tensors.update(encode_packed(base_name, out.base.codes, out.base.scale, out.base.zero, bits, group))
        tensors.update(_encode_tucker(names, out.quantised, dtypes))
        recon = out.reconstruction()
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())  # every tensor written
    f0 = weighted_objective(T64, A, B)
    rel = float(torch.linalg.norm(T64 - recon) / torch.linalg.norm(T64))
    record = {**option.to_dict(), "bytes": nbytes, "relative_error": rel,
              "whitened_error": math.sqrt(max(0.0, weighted_objective(T64, A, B, recon)) / f0) if f0 > 0 else 0.0}
    return tensors, record


__all__ = ["BytesMethod", "projection_options", "smallest_bytes", "realise", "storage_dtypes", "tucker_bytes", "base_bytes",
           "base_shape", "rank_grid", "U_E_DTYPE"]

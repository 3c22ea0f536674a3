"""Uniform quantisation grids, one per group of consecutive values: fit, quantise, dequantise.

A grid of ``b`` bits maps a group ``x [..., g]`` to integer codes and back:

* asymmetric (``symmetric=False``): codes ``q`` in ``[0, 2^b - 1]``,
  ``x_hat = (q - zero) * scale`` with a float16 ``scale`` and a float16 ``zero`` per group
  (the zero is not rounded to an integer: it costs the same two bytes and fits better);
* symmetric: codes in ``[-(2^(b-1) - 1), 2^(b-1) - 1]``, ``x_hat = q * scale`` (the factor
  codec of :mod:`tuckerize.quant`: int8, int4).

The range of a group is its min/max (asymmetric) or largest magnitude (symmetric), and
with ``clip`` shrunk by the factor of :data:`CLIP_GRID` that gives the smallest squared
error of that group (the MSE search of GPTQ's reference and of HQQ's initialisation: at
2 and 3 bits the outliers of a group cost more range than they are worth).
Scale and zero are rounded to float16 before the codes are chosen, so a reader of the
stored float16 values reconstructs exactly ``x_hat``. Pure tensor maths, any float dtype; the
storage of the codes is :mod:`tuckerize.quant_packed` (asymmetric) and :mod:`tuckerize.quant`
(symmetric), the error feedback that chooses them :mod:`tuckerize.decompose.gptq`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: Shrink factors of a group's range tried by ``clip`` (1 = no clipping).
CLIP_GRID = tuple(1.0 - 0.025 * k for k in range(21))  # 1.0 ... 0.5

_F16_TINY = torch.finfo(torch.float16).tiny


@dataclass(frozen=True)
class Grid:
    """``bits`` (1..8; symmetric 2..8), ``group`` (values per scale along the grouped axis),
    ``symmetric`` and ``clip`` (module docstring)."""

    bits: int
    group: int
    symmetric: bool = False
    clip: bool = True

    def __post_init__(self) -> None:
        if not (2 if self.symmetric else 1) <= self.bits <= 8:
            raise ValueError(f"a {'symmetric ' if self.symmetric else ''}grid of {self.bits} bits; "
                             f"{2 if self.symmetric else 1} to 8 are supported")
        if self.group < 1:
            raise ValueError(f"group size {self.group} must be at least 1")

    @property
    def qmax(self) -> int:
        """Largest code: ``2^b - 1`` (asymmetric) or ``2^(b-1) - 1`` (symmetric)."""
        return (1 << self.bits) - 1 if not self.symmetric else (1 << (self.bits - 1)) - 1

    @property
    def qmin(self) -> int:
        return 0 if not self.symmetric else -self.qmax


def _f16(x: torch.Tensor) -> torch.Tensor:
    """Rounded to float16 and back, tiny positive values kept at float16's smallest normal."""
    y = x.to(torch.float16).to(x.dtype)
    return torch.where((x > 0) & (y == 0), torch.full_like(x, _F16_TINY), y)


def _params(x: torch.Tensor, grid: Grid, shrink: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) [...] of groups ``x [..., g]`` with the range shrunk by ``shrink``."""
    if grid.symmetric:
        amax = x.abs().amax(-1) * shrink
        return _f16(amax / grid.qmax), torch.zeros_like(amax)
    lo = x.amin(-1).clamp(max=0) * shrink
    hi = x.amax(-1).clamp(min=0) * shrink
    scale = _f16((hi - lo) / grid.qmax)
    zero = torch.where(scale > 0, -lo / scale.clamp_min(_F16_TINY), torch.zeros_like(lo))
    return scale, zero.to(torch.float16).to(x.dtype)


def codes(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Integer codes (in ``x``'s float dtype) of groups ``x [..., g]`` on ``(scale, zero) [...]``."""
    s = scale.clamp_min(_F16_TINY)[..., None]
    q = torch.round(x / s + zero[..., None])
    q = q.clamp(grid.qmin, grid.qmax)
    return torch.where(scale[..., None] > 0, q, torch.round(zero[..., None]).clamp(grid.qmin, grid.qmax))


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """``(q - zero) * scale`` for codes ``q [..., g]`` and ``(scale, zero) [...]``."""
    return (q - zero[..., None]) * scale[..., None]


def fit(x: torch.Tensor, grid: Grid, weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero ``[...]`` of every group ``x [..., g]`` (the last axis is one group).

    With ``grid.clip`` the shrink factor of :data:`CLIP_GRID` with the smallest error of each
    group is kept; the error is ``sum weight * (x - x_hat)^2`` (``weight``: broadcastable to
    ``x``, e.g. the diagonal of an input covariance; default 1)."""
    scale, zero = _params(x, grid, 1.0)
    if not grid.clip:
        return scale, zero
    best = None
    for shrink in CLIP_GRID:
        s, z = (scale, zero) if shrink == 1.0 else _params(x, grid, shrink)
        d = x - dequantize(codes(x, s, z, grid), s, z)
        err = (d * d if weight is None else weight * d * d).sum(-1)
        if best is None:
            best = err
            continue
        better = err < best
        best = torch.where(better, err, best)
        scale, zero = torch.where(better, s, scale), torch.where(better, z, zero)
    return scale, zero


def groups(x: torch.Tensor, g: int) -> torch.Tensor:
    """``x [..., n]`` as ``[..., ceil(n/g), g]``; a short last group is padded with its own
    first value (the padding widens no range)."""
    n = x.shape[-1]
    k = -(-n // g)
    pad = k * g - n
    if pad:
        first = x[..., (k - 1) * g : (k - 1) * g + 1].expand(*x.shape[:-1], pad)
        x = torch.cat([x, first], -1)
    return x.reshape(*x.shape[:-1], k, g)


def round_to_grid(x: torch.Tensor, grid: Grid) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round to nearest in groups of ``grid.group`` along the last axis of ``x [..., cols]``:
    ``(codes [..., cols], scale [..., n_groups], zero [..., n_groups], x_hat [..., cols])``."""
    cols = x.shape[-1]
    gv = groups(x, min(grid.group, cols))
    s, z = fit(gv, grid)
    q = codes(gv, s, z, grid)
    flat = (*x.shape[:-1], -1)
    return q.reshape(flat)[..., :cols], s, z, dequantize(q, s, z).reshape(flat)[..., :cols]


def fake_quantize(x: torch.Tensor, grid: Grid) -> torch.Tensor:
    """``x`` rounded to nearest on ``grid`` along its last axis and dequantised."""
    return round_to_grid(x, grid)[3]


__all__ = ["Grid", "CLIP_GRID", "fit", "codes", "dequantize", "groups", "round_to_grid", "fake_quantize"]

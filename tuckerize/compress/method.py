"""How a decomposition is computed (the research settings), read from a config's ``method:``.

The command line keeps what a user chooses (model, ranks or budget, calibration, factor
storage, output); the settings below live in the YAML given to ``--config``, next to or
instead of the ranks (``configs/method.yaml`` lists them all)::

    method:
      whiten: true          # whiten by the calibration statistics (false: plain Tucker,
                            # statistics used for --ratio/--params allocation only)
      whitening: expert     # expert: per-expert weights, alternating least squares; pooled:
                            # one whitening per mode, closed form
      damp: null            # ridge relative to each covariance's mean eigenvalue
                            # (null: 0.1 for expert, 1 for pooled)
      als_iters: 3          # alternation sweeps of whitening: expert
      expert_hidden: false  # expert with each expert's own hidden covariance (E x H x H)
      alloc_damp: null      # ridge of the spectra that --ratio/--params allocation compares (null: 10)
      refit_damp: 0.01      # ridge of the per-expert core refit (refit: true)
      iters: 0              # HOOI sweeps after ST-HOSVD
      tol: 0.0001           # HOOI stopping tolerance
      refit: false          # refit each expert's core to its own routed calibration data
                            # (needs --calibration text; one more pass per layer)
      sequential: false     # calibrate each layer on the outputs of the compressed layers
      expert_rank: full     # with --ratio/--params: full keeps r_E = number of experts,
                            # auto allocates it too
      bytes:                # --bytes B: the stored forms the allocator may choose
        forms: [tucker, base, base+tucker]
        base_bits: [2, 3, 4]          # bits of a GPTQ-quantised base (1 to 8)
        base_groups: [32, 64, 128]    # its group sizes along the input axis
        tucker_storages: [int4, "int8,core=int4"]   # of a Tucker-only form
        residual_storage: int4        # of the Tucker residual beside a base
        rank_steps: 16                # ranks tried per mode (about dim / 16 apart)
        residual_max: 0.5             # largest residual rank, as a fraction of the mode
        residual_rounds: 2            # alternations of base and residual
        residual_init: base           # base: GPTQ first; tucker: the residual first
        gptq_damp: 0.01               # GPTQ's ridge, relative to the mean eigenvalue

Every value shown is the default. :class:`Method` is validated once, here.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping

from tuckerize.allocate_bytes import FORMS
from tuckerize.errors import CalibrationError, RankError

#: HOOI sweeps after ST-HOSVD. Measured (BENCHMARKS.md): on expert tensors a sweep
#: lowers the relative error by well under 1% of itself at about 1.6x the HOSVD cost,
#: so the default is the HOSVD alone.
DEFAULT_ITERS = 0


@dataclass(frozen=True)
class Method:
    """The ``method:`` section (module docstring); ``None`` damps take the method's default."""

    whiten: bool = True
    whitening: str = "expert"
    damp: float | None = None
    als_iters: int = 3
    expert_hidden: bool = False
    alloc_damp: float | None = None
    refit_damp: float = 1e-2
    iters: int = DEFAULT_ITERS
    tol: float = 1e-4
    refit: bool = False
    sequential: bool = False
    expert_rank: str = "full"
    bytes: "BytesMethod" = None  # type: ignore[assignment]  # --bytes: BytesMethod() when None

    def __post_init__(self) -> None:
        if not isinstance(self.bytes, BytesMethod):
            object.__setattr__(self, "bytes", bytes_method_from(self.bytes, "method"))

    def check(self, where: str = "method") -> None:
        """One rule per setting: ridges > 0 and finite, sweeps >= 0, switches true/false,
        known names."""
        from tuckerize.calibration.weights import check_ridge

        for name in ("damp", "alloc_damp", "refit_damp"):
            if getattr(self, name) is not None:
                check_ridge(f"{where}.{name}", getattr(self, name))
        if self.whitening not in ("expert", "pooled"):
            raise CalibrationError(f"{where}.whitening {self.whitening!r} is not 'expert' or 'pooled'")
        if not isinstance(self.als_iters, int) or self.als_iters < 0:
            raise CalibrationError(f"{where}.als_iters {self.als_iters} is negative; use 0 or more sweeps")
        if self.expert_hidden and self.whitening != "expert":
            raise CalibrationError(f"{where}.expert_hidden needs {where}.whitening: expert")
        if not isinstance(self.iters, int) or self.iters < 0:
            raise RankError(f"{where}.iters {self.iters} is negative; use 0 (ST-HOSVD only) or a positive number "
                            "of HOOI sweeps")
        if not (isinstance(self.tol, (int, float)) and self.tol >= 0):
            raise RankError(f"{where}.tol {self.tol} must be a number >= 0")
        for name in ("whiten", "expert_hidden", "refit", "sequential"):
            if not isinstance(getattr(self, name), bool):
                raise CalibrationError(f"{where}.{name} {getattr(self, name)!r} is not true or false")
        if self.expert_rank not in ("full", "auto"):
            raise RankError(f"{where}.expert_rank {self.expert_rank!r} is not 'full' (r_E = number of experts) "
                            "or 'auto'")
        self.bytes.check(f"{where}.bytes")

    def whiten_options(self):
        """The :class:`tuckerize.calibration.weights.WhitenOptions` of these settings."""
        from tuckerize.calibration.weights import WhitenOptions

        return WhitenOptions(method=self.whitening, damp=self.damp, iters=self.als_iters,
                             expert_hidden=self.expert_hidden)


@dataclass(frozen=True)
class BytesMethod:
    """``method: bytes:``, the settings of ``--bytes`` (module docstring; defaults measured on
    the demo models' selection split, BENCHMARKS.md)."""

    forms: tuple[str, ...] = FORMS
    base_bits: tuple[int, ...] = (2, 3, 4)
    base_groups: tuple[int, ...] = (32, 64, 128)
    tucker_storages: tuple[str, ...] = ("int4", "int8,core=int4")
    residual_storage: str = "int4"
    rank_steps: int = 16
    residual_max: float = 0.5
    residual_rounds: int = 2
    residual_init: str = "base"
    gptq_damp: float = 0.01

    def to_dict(self) -> dict[str, Any]:
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v for f in fields(self)}

    def check(self, where: str = "method") -> None:
        from tuckerize.quant import parse_factor_dtype

        bad = [f for f in self.forms if f not in FORMS]
        if bad or not self.forms:
            raise RankError(f"{where}.bytes_forms {list(self.forms)}: each must be one of {', '.join(FORMS)}")
        if any(not 1 <= b <= 8 for b in self.base_bits) or any(g < 1 for g in self.base_groups):
            raise RankError(f"{where}.base_bits {list(self.base_bits)} / base_groups {list(self.base_groups)}: "
                            "bits 1 to 8, groups of at least 1 value")
        for s in (*self.tucker_storages, self.residual_storage):
            parse_factor_dtype(s)
        if not 0 < self.residual_max <= 1:
            raise RankError(f"{where}.residual_max {self.residual_max}: the largest residual rank as a fraction "
                            "of each mode, in (0, 1]")
        if self.residual_init not in ("base", "tucker") or self.residual_rounds < 1 or self.rank_steps < 1:
            raise RankError(f"{where}: residual_init {self.residual_init!r} (base or tucker), residual_rounds "
                            f"{self.residual_rounds} and rank_steps {self.rank_steps} (at least 1)")
        if not (self.gptq_damp > 0 and math.isfinite(self.gptq_damp)):
            raise RankError(f"{where}.gptq_damp {self.gptq_damp} must be a positive ridge, e.g. 0.01")


def bytes_method_from(data: Any, source: str) -> BytesMethod:
    """``method: bytes:`` as a :class:`BytesMethod` (lists become tuples; unknown keys refused)."""
    if data is None:
        return BytesMethod()
    if isinstance(data, BytesMethod):
        return data
    if not isinstance(data, Mapping):
        raise RankError(f"{source}: 'method: bytes:' must be a mapping of settings such as 'base_bits: [2, 3]'")
    known = {f.name for f in fields(BytesMethod)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise RankError(f"{source}: method.bytes setting {unknown[0]!r} is unknown; allowed: {', '.join(sorted(known))}")
    return BytesMethod(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


def method_from_dict(data: Any, source: str) -> Method:
    if data is None:
        return Method()
    if not isinstance(data, Mapping):
        raise CalibrationError(f"{source}: 'method:' must be a mapping of settings such as 'whitening: expert'")
    known = {f.name for f in fields(Method)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise CalibrationError(f"{source}: method setting {unknown[0]!r} is unknown; "
                               f"allowed: {', '.join(sorted(known))}")
    data = dict(data)
    if "bytes" in data:
        data["bytes"] = bytes_method_from(data["bytes"], source)
    method = dataclasses.replace(Method(), **data)
    method.check(f"{source}: method")
    return method


def load_method(path: str | Path | None) -> Method:
    """The ``method:`` section of the YAML at ``path`` (defaults when absent or no path)."""
    if path is None:
        return Method()
    from tuckerize.ranks import read_yaml

    data = read_yaml(path)
    return method_from_dict((data or {}).get("method"), str(path))

"""From calibration statistics to the weights of the decomposition.

:class:`WhitenOptions` (``--whitening``, ``--damp``, ``--als-iters``, ``--expert-hidden``)
chooses how: :func:`mode_weights` gives the pooled per-mode whitenings of
:mod:`tuckerize.decompose.whiten`; :func:`expert_weights` the per-expert two-sided weights
``(A [H, H] or [E, H, H], B [E, I, I])`` of :mod:`tuckerize.decompose.expert_weighted`.
The defaults are measured on the demo models (BENCHMARKS.md).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Mapping

import torch

from tuckerize.calibration.stats import EXPERT_FIELDS
from tuckerize.decompose.whiten import DEFAULT_DAMP
from tuckerize.errors import CalibrationError

#: Ridge of the per-expert weights (relative to each covariance's mean eigenvalue) and
#: alternation sweeps of ``--whitening expert``: measured on the demo models (BENCHMARKS.md).
DEFAULT_EXPERT_DAMP = 0.1
DEFAULT_EXPERT_ITERS = 3


def check_ridge(name: str, value: Any) -> None:
    """The one rule for every ridge (``damp``, ``alloc_damp``, ``refit_damp``): a positive,
    finite number, relative to a covariance's mean eigenvalue."""
    if not (isinstance(value, (int, float)) and value > 0 and math.isfinite(value)):
        raise CalibrationError(f"{name} {value} must be a positive number (a ridge relative to the mean eigenvalue, e.g. 1)")


@dataclass(frozen=True)
class WhitenOptions:
    """How statistics become the weights of the decomposition.

    ``method``: ``"expert"`` (default): per-expert two-sided weights, solved by alternating
    least squares (:mod:`tuckerize.decompose.expert_weighted`), started from the pooled
    whitening; ``"pooled"``: one whitening matrix per mode
    (:mod:`tuckerize.decompose.whiten`), the closed-form ST-HOSVD of the whitened tensor.
    ``damp``: ridge relative to the mean eigenvalue of each covariance (default by method,
    both measured on the demo models, BENCHMARKS.md: 0.1 for ``expert``, 1 for ``pooled``).
    ``iters``: alternation sweeps of ``expert`` (measured: 3).
    ``expert_hidden``: ``expert`` with each expert's own hidden covariance instead of the
    pooled one (needs statistics collected with ``per_expert=True``; E x H x H per layer,
    for small models).
    ``weighting``: ``"routed"`` (covariances weighted by squared routing weights, as the
    block output weighs each expert's error) or ``"tokens"`` (every routed token once), for
    the pooled covariances.
    ``expert_weight``: ``pooled`` only: also weight the expert mode by each expert's routed
    mass (a diagonal weight; approximates per-expert covariances C_e by m_e * C).
    """

    method: str = "expert"
    damp: float | None = None
    iters: int = DEFAULT_EXPERT_ITERS
    expert_hidden: bool = False
    weighting: str = "routed"
    expert_weight: bool = False

    def __post_init__(self) -> None:
        if self.method not in ("expert", "pooled"):
            raise CalibrationError(f"--whitening {self.method!r} is not 'expert' or 'pooled'")
        if self.damp is None:
            object.__setattr__(self, "damp", DEFAULT_EXPERT_DAMP if self.method == "expert" else DEFAULT_DAMP)
        check_ridge("damp", self.damp)
        if self.iters < 0:
            raise CalibrationError(f"--als-iters {self.iters} is negative; use 0 or more sweeps")
        if self.expert_hidden and self.method != "expert":
            raise CalibrationError("--expert-hidden needs --whitening expert")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def expert_weights(layer_stats: Mapping[str, torch.Tensor], projection: str, down: torch.Tensor | None,
                   options: WhitenOptions) -> tuple[torch.Tensor | None, torch.Tensor]:
    """``(A, B)`` of :func:`~tuckerize.decompose.expert_weighted.expert_weighted_tucker` for
    one projection: A on the hidden side (None for down, whose hidden side is the block
    output), B [E, I, I] on the intermediate side. ``down``: the layer's down projection
    [E, H, I] (semantic axes), needed for gate/up (their output reaches the block output
    through it). Ridged by ``options.damp``; float64 on ``down``'s device (the CPU when
    ``down`` is absent or its device has no float64)."""
    from tuckerize.decompose.expert_weighted import ridge, solver_dtype

    missing = [k for k in EXPERT_FIELDS if k not in layer_stats]
    if missing or (options.expert_hidden and "hidden_expert" not in layer_stats):
        raise CalibrationError("the calibration statistics lack per-expert fields "
                               f"({(missing or ['hidden_expert'])[0]}); they were written by an older tuckerize or "
                               "without method.expert_hidden: pass --calibration TEXT instead of these statistics "
                               "(and delete them from --out) to recollect")
    device = down.device if down is not None else torch.device("cpu")
    if solver_dtype(device) != torch.float64:  # formed in float64 on the CPU; the solver casts them
        device = torch.device("cpu")
    damp = float(options.damp)  # type: ignore[arg-type]
    if projection == "down":
        return None, ridge(layer_stats["inter_expert"].to(device), damp)
    if down is None:
        raise ValueError("gate/up weights need the layer's down projection")
    D = down.to(device, torch.float64)
    sens = layer_stats[f"{projection}_expert"].to(device, torch.float64)
    B = ridge(torch.matmul(D.transpose(1, 2), D) * sens, damp)
    if options.expert_hidden:
        A = ridge(layer_stats["hidden_expert"].to(device), damp)
    else:
        key = "hidden_routed" if options.weighting == "routed" else "hidden"
        A = ridge(layer_stats[key].to(device), damp)
    return A, B


def mode_weights(layer_stats: Mapping[str, torch.Tensor], projection: str, options: WhitenOptions):
    """``[W_E, W_H, W_I]`` (:class:`~tuckerize.decompose.whiten.Whitening` or None) of one
    projection: the hidden side of gate/up, the intermediate side of down."""
    from tuckerize.decompose.whiten import diagonal_whitening, whitening

    suffix = "_routed" if options.weighting == "routed" else ""
    if options.weighting not in ("routed", "tokens"):
        raise CalibrationError(f"whitening weighting {options.weighting!r} is not 'routed' or 'tokens'")
    wE = None
    if options.expert_weight:
        mass = layer_stats["expert_mass" if options.weighting == "routed" else "expert_count"]
        wE = diagonal_whitening(mass, options.damp)
    if projection == "down":
        return [wE, None, whitening(layer_stats["inter" + suffix], options.damp)]
    return [wE, whitening(layer_stats["hidden" + suffix], options.damp), None]


__all__ = ["DEFAULT_EXPERT_DAMP", "DEFAULT_EXPERT_ITERS", "WhitenOptions", "expert_weights", "mode_weights"]

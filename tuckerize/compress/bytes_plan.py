"""Storage for a byte budget (``--bytes B``): every projection's candidate forms, one chosen each.

:func:`allocate_bytes_plan` stacks each MoE projection, lists its candidate stored forms with
their exact bytes and estimated output errors (:func:`tuckerize.compress.forms.projection_options`,
in the metric of the ``--ratio`` allocator: the input side whitened by the pooled statistics
with ridge ``method.alloc_damp``), and chooses one per projection for the budget
(:func:`tuckerize.allocate_bytes.choose`). Under torchrun each rank lists the options of the
layers it will decompose and every rank chooses from all of them, as for ``--ratio``.

:class:`BytesPlan` is the result: the option of every (layer, projection), and the record of
how the budget is spent (the manifest's ``bytes["budget"]`` and the decompose report).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

from tuckerize.allocate_bytes import Choice, Option
from tuckerize.arch import PROJECTIONS


def dense_bytes(spec) -> int:
    """Bytes of the routed experts as bf16 dense weights (the budget's unit)."""
    E, H, I = spec.shape
    return len(PROJECTIONS) * E * H * I * 2 * len(spec.moe_layers)


@dataclass
class BytesPlan:
    """The chosen form of every (layer, projection) for a budget of ``fraction`` of
    ``dense`` bytes."""

    choice: Choice
    fraction: float
    dense: int

    def option(self, layer: int, proj: str) -> Option:
        return self.choice.options[(layer, proj)]

    def ranks_for(self, layer: int, proj: str) -> tuple[int, int, int] | None:
        """The Tucker ranks of ``proj`` in ``layer`` (None: a base alone)."""
        return self.option(layer, proj).ranks

    def layer_ranks(self) -> dict[str, dict[str, list[int] | None]]:
        """``{"layer": {projection: [r_E, r_H, r_I] | None}}`` (the fingerprint's and config's ranks)."""
        out: dict[str, dict[str, list[int] | None]] = {}
        for (layer, proj), o in self.choice.options.items():
            out.setdefault(str(layer), {})[proj] = list(o.ranks) if o.ranks is not None else None
        return out

    def forms(self) -> dict[str, dict[str, dict[str, Any]]]:
        """``{"layer": {projection: {"form", "base", "storage"}}}``: what the config records
        beside the ranks (the reader builds each layer's experts from it)."""
        from tuckerize.compress.forms import storage_dtypes

        out: dict[str, dict[str, dict[str, Any]]] = {}
        for (layer, proj), o in self.choice.options.items():
            entry: dict[str, Any] = {"form": o.form}
            if o.base is not None:
                entry["base"] = {"bits": o.base[0], "group": o.base[1]}
            if o.storage is not None:
                entry["storage"] = storage_dtypes(o.storage)
            out.setdefault(str(layer), {})[proj] = entry
        return out

    def to_dict(self) -> dict[str, Any]:
        """The manifest's ``rank_plan`` of a ``--bytes`` run: every projection's chosen option."""
        layers: dict[str, dict[str, Any]] = {}
        for (layer, proj), o in self.choice.options.items():
            layers.setdefault(str(layer), {})[proj] = o.to_dict()
        return {"source": "bytes", "budget": self.fraction, "layers": layers}

    def info(self) -> dict[str, Any]:
        """The manifest's ``bytes["budget"]``: the budget, what was used, the smallest
        feasible budget and the estimate, all in bytes and as fractions of the bf16 dense experts."""
        c, d = self.choice, self.dense
        forms: dict[str, int] = {}
        for o in c.options.values():
            forms[o.form] = forms.get(o.form, 0) + 1
        return {"fraction": self.fraction, "bytes": c.budget, "allocated": c.used, "allocated_fraction": c.used / d,
                "smallest_feasible": c.minimum, "smallest_feasible_fraction": c.minimum / d,
                "estimated_error": c.estimated_error, "forms": forms}

    def header(self, label: str) -> str:
        c = self.choice
        return (f"Storage chosen by tuckerize for {label}: {c.used:,} of {self.dense:,} bf16 dense expert bytes "
                f"({c.used / self.dense:.2%}; budget {self.fraction:g} = {c.budget:,} bytes)")


def _fraction_text(dense: int):
    return lambda b: f"{b / dense:.4f} of the bf16 dense experts' bytes ({b:,} bytes)"


def check_bytes_budget(spec, fraction: float, method) -> None:
    """Refuse, before any work, a budget below the smallest storable form (from the shapes:
    :func:`tuckerize.compress.forms.smallest_bytes` of every projection)."""
    from tuckerize.compress.forms import smallest_bytes
    from tuckerize.errors import RankError

    d = dense_bytes(spec)
    minimum = len(spec.moe_layers) * sum(smallest_bytes(spec.shape, p, method) for p in PROJECTIONS)
    budget = int(fraction * d)
    if budget < minimum:
        unit = _fraction_text(d)
        raise RankError(f"--bytes {fraction:g}: a budget of {unit(budget)} is below the smallest storable form of "
                        f"the routed experts; the smallest feasible budget is --bytes {math.ceil(minimum / d * 1e4) / 1e4:g} "
                        f"({minimum:,} bytes)")


def allocate_bytes_plan(request, source, fraction: float, cal_stats, progress, device, method,
                        parallel=None) -> BytesPlan:
    """The :class:`BytesPlan` of ``fraction`` (module docstring). ``method``:
    :class:`tuckerize.compress.method.BytesMethod`; ``request``: the
    :class:`~tuckerize.compress.request.DecomposeRequest` (its ``method.alloc_damp``)."""
    import dataclasses

    from tuckerize.allocate_bytes import choose
    from tuckerize.calibration.weights import mode_weights
    from tuckerize.compress.distribute import per_projection
    from tuckerize.compress.forms import projection_options
    from tuckerize.decompose.whiten import DEFAULT_ALLOC_DAMP
    from tuckerize.experts import stack_projection

    spec = source.spec
    damp = request.method.alloc_damp if request.method.alloc_damp is not None else DEFAULT_ALLOC_DAMP
    metric = dataclasses.replace(request.whiten_options, method="pooled", damp=damp, expert_weight=False)
    layer_stats = functools.lru_cache(maxsize=1)(lambda layer: cal_stats.layers[layer])  # read once per layer

    def options(layer: int, proj: str) -> list[Option]:
        stats = layer_stats(layer)
        T = stack_projection(source.ckpt, spec, layer, proj).to(device)
        on_device = {k: v.to(device) for k, v in stats.items() if k in ("hidden_routed", "inter_expert")}
        return projection_options(T, on_device, proj, method, mode_weights(stats, proj, metric))

    found = per_projection(source, options, progress, parallel)
    d = dense_bytes(spec)
    choice = choose(found, int(fraction * d), what=f"--bytes {fraction:g}", unit=_fraction_text(d))
    return BytesPlan(choice=choice, fraction=fraction, dense=d)


__all__ = ["BytesPlan", "allocate_bytes_plan", "dense_bytes"]

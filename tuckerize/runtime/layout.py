"""The tensor-parallel layout of a Tucker checkpoint and its expert assignment, from shapes.

:func:`layer_costs` and :func:`layout_costs` count, per token, the slowest rank's
multiply-adds and the values a rank sends for every layout (and for dense tensor
parallelism), from the shapes of the modules each rank builds on the meta device;
:func:`choose_layout` takes the cheapest; :func:`layout_plan` is the one rule that
``tuckerize shard``, the vLLM plugin and the runtime on an unsharded checkpoint apply
(layout, then experts assigned by measured load, read from the checkpoint's calibration
statistics); :func:`with_assignment` records the plan in a config's ``shard`` section.
Which slice of each tensor a rank then holds is :mod:`tuckerize.runtime.plan`.
"""

from __future__ import annotations

from typing import Any, Mapping

from tuckerize.arch import moe_spec
from tuckerize.parallel import ParallelContext, check_layout


def layer_costs(shape: tuple[int, int, int], top_k: int, ranks: Mapping[str, tuple[int, int, int]],
                layout: str, tp: int) -> dict[str, float]:
    """Per token, one MoE layer: the slowest rank's multiply-adds and the values each rank
    sends, from the shapes of the :class:`TuckerExperts` each rank builds (meta device).
    ``layout="dense"``: dense experts split as dense tensor parallelism splits them."""
    import torch

    from tuckerize.runtime.moe import DenseExperts
    from tuckerize.runtime.tucker_experts import TuckerExperts

    E, H, I = shape
    worst: dict[str, Any] = {"macs": 0.0, "sent": 0.0}
    for rank in range(tp):
        parallel = ParallelContext(rank=rank, world=tp)
        if layout == "dense":
            m = DenseExperts(E, H, I, parallel, device="meta", dtype=torch.float32)
        else:
            m = TuckerExperts(E, H, I, ranks, layout=layout, parallel=parallel, device="meta", dtype=torch.float32)
        c = m.cost_per_token(top_k)
        worst = {"macs": max(worst["macs"], c["macs"]), "sent": max(worst["sent"], c["sent"]), "payload": c["payload"]}
    return worst


def base_layer_costs(shape: tuple[int, int, int], top_k: int, entry: Mapping[str, Any], layout: str,
                     tp: int) -> dict[str, float]:
    """:func:`layer_costs` of a layer stored with a quantised base (``entry``: its config
    section; :class:`~tuckerize.runtime.base_experts.BaseResidualExperts`); layouts it does not
    run in cost infinity."""
    import torch

    from tuckerize.runtime.base_experts import BASE_LAYOUTS, BaseResidualExperts, projection_forms

    if layout not in BASE_LAYOUTS:
        return {"macs": float("inf"), "sent": float("inf"), "payload": {}}
    E, H, I = shape
    worst: dict[str, Any] = {"macs": 0.0, "sent": 0.0}
    for rank in range(tp):
        m = BaseResidualExperts(E, H, I, projection_forms(entry), layout=layout,
                                parallel=ParallelContext(rank=rank, world=tp), device="meta", dtype=torch.float32)
        c = m.cost_per_token(top_k)
        worst = {"macs": max(worst["macs"], c["macs"]), "sent": max(worst["sent"], c["sent"]), "payload": c["payload"]}
    return worst


def layout_costs(config: Mapping[str, Any], tp: int) -> dict[str, dict[str, float]]:
    """Per token, summed over a Tucker checkpoint's MoE layers: the slowest rank's
    multiply-adds and the values a rank sends, for every layout and for dense TP (infinity
    for a layout some layer's stored form does not run in)."""
    from tuckerize.format import CONFIG_KEY
    from tuckerize.parallel import LAYOUTS
    from tuckerize.runtime.base_experts import has_base

    spec = moe_spec(config)
    out: dict[str, dict[str, float]] = {}
    for layout in (*LAYOUTS, "dense"):
        total = {"macs": 0.0, "sent": 0.0}
        for layer in spec.moe_layers:
            entry = config[CONFIG_KEY]["layers"][str(layer)]
            if has_base(entry) and layout != "dense":
                c = base_layer_costs(spec.shape, spec.top_k, entry, layout, tp)
            else:
                ranks = {p: tuple(entry[p]["ranks"]) for p in ("gate", "up", "down")}
                c = layer_costs(spec.shape, spec.top_k, ranks, layout, tp)
            total = {k: total[k] + c[k] for k in total}
        out[layout] = total
    return out


def choose_layout(config: Mapping[str, Any], tp: int) -> tuple[str, dict[str, dict[str, float]]]:
    """The layout with the fewest multiply-adds on the slowest rank among those that send
    no more than dense tensor parallelism (any layout if none does); ties go to the
    earlier of :data:`tuckerize.parallel.LAYOUTS`. Returns it and :func:`layout_costs`."""
    from tuckerize.parallel import LAYOUTS

    costs = layout_costs(config, tp)
    runs = [l for l in LAYOUTS if costs[l]["macs"] != float("inf")]
    ok = [l for l in runs if costs[l]["sent"] <= costs["dense"]["sent"]] or runs
    best = min(ok, key=lambda l: (round(costs[l]["macs"]), LAYOUTS.index(l)))
    return best, costs


def layout_plan(config: Mapping[str, Any], tp: int, layout: str | None = None, folder=None,
                load: Mapping[int, Any] | None = None, balance_above: float = 0.2):
    """The layout and expert assignment of ``tp`` ranks, the one rule of ``tuckerize shard``,
    the vLLM plugin and the runtime on an unsharded checkpoint under torchrun.

    ``layout`` None or ``"auto"``: :func:`choose_layout` (then ``costs`` is its table, else
    None). Layouts that split experts assign them by measured load
    (:func:`tuckerize.parallel.assign_experts`): ``load`` ``{layer: routed tokens per
    expert}``, by default the counts saved with the calibration statistics in ``folder``.
    Returns ``(layout, costs, assignment)``; ``assignment`` is ``{}`` when nothing is split or
    measured."""
    from pathlib import Path

    from tuckerize.parallel import EXPERT_SPLIT_LAYOUTS, assign_experts

    costs = None
    if layout is None or layout == "auto":
        layout, costs = choose_layout(config, tp) if tp > 1 else ("intermediate", None)
    check_layout(layout)
    assignment: dict[int, Any] = {}
    if layout in EXPERT_SPLIT_LAYOUTS and tp > 1:
        if load is None and folder is not None and Path(folder).is_dir():
            from tuckerize.calibration.store import expert_load

            load = expert_load(Path(folder))
        assignment = assign_experts(load or {}, tp, balance_above)
    return layout, costs, assignment


def with_assignment(config: Mapping[str, Any], tp: int, layout: str, assignment: Mapping[int, Any]) -> dict[str, Any]:
    """``config`` with the ``shard`` section the runtime reads (layout, and the experts of each
    rank where they were assigned by load): how a shard set's config records its plan."""
    out = dict(config)
    out["shard"] = {"tp": tp, "layout": layout}
    moved = {str(L): a["ranks"] for L, a in assignment.items() if a["assigned"]}
    if moved:
        out["shard"]["experts"] = moved
    return out


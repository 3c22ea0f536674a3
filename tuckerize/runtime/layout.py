"""Which slice of each full tensor a rank holds, asked of the runtime's own layers.

:func:`rank_splits` builds the model skeleton for one rank on the meta device (no
memory, no data) from a :class:`~tuckerize.runtime.loader.SplitRecorder`; every layer
that splits a weight answers through its ``shard_spec`` exactly as it does when it
loads, so the shard writer and the runtime cannot disagree. Architectures without a
native model (DeepSeek's MLA, Qwen3-Next) split only their Tucker factors, by
:class:`~tuckerize.runtime.tucker_experts.TuckerExperts`' own rule; every other tensor
of theirs is replicated.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

from tuckerize.arch import moe_spec
from tuckerize.parallel import ParallelContext, Split, check_layout, check_tp


def rank_splits(config: Mapping[str, Any], tp: int, rank: int, layout: str,
                names: Iterable[str] = ()) -> dict[str, Split]:
    """``{tensor name: Split}`` for rank ``rank`` of ``tp``; tensors not listed are
    replicated. ``names``: the checkpoint's tensor names (to tell a tied LM head)."""
    import torch

    from tuckerize.runtime.loader import SplitRecorder, build_experts
    from tuckerize.runtime.model import CausalLM

    check_layout(layout)
    check_tp(config, tp)
    if tp == 1:
        return {}
    recorder = SplitRecorder(dict(config), ParallelContext(rank=rank, world=tp), layout, names)
    spec = moe_spec(config)
    with torch.device("meta"):
        if spec.arch.native:
            CausalLM(recorder, dense_experts=not recorder.is_tucker, dtype=torch.float32, device="meta")
        else:
            for layer in spec.moe_layers:
                build_experts(recorder, layer, dtype=torch.float32, device="meta")
    return recorder.splits


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


def layout_costs(config: Mapping[str, Any], tp: int) -> dict[str, dict[str, float]]:
    """Per token, summed over a Tucker checkpoint's MoE layers: the slowest rank's
    multiply-adds and the values a rank sends, for every layout and for dense TP."""
    from tuckerize.format import CONFIG_KEY
    from tuckerize.parallel import LAYOUTS

    spec = moe_spec(config)
    out: dict[str, dict[str, float]] = {}
    for layout in (*LAYOUTS, "dense"):
        total = {"macs": 0.0, "sent": 0.0}
        for layer in spec.moe_layers:
            entry = config[CONFIG_KEY]["layers"][str(layer)]
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
    ok = [l for l in LAYOUTS if costs[l]["sent"] <= costs["dense"]["sent"]] or list(LAYOUTS)
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


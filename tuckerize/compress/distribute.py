"""Which rank decomposes which output unit when ``decompose`` runs under torchrun.

:func:`assign_units` is a pure function of the units' work and the world size, so every
rank computes the same assignment and a rerun with another number of processes simply
assigns again (the journal, not the assignment, says what is done). The work of a unit
is the number of routed-expert tensors it replaces (a MoE layer's E x 3 tensors): that is
what dominates both reading and decomposing; units without experts weigh 0 and only
even out the count of files. The source files to hash are dealt out the same way, by size.
"""

from __future__ import annotations


def assign_units(work: dict[int, int], world: int) -> dict[int, int]:
    """unit -> rank for ``work`` (unit -> routed-expert tensors it replaces; or any item ->
    its cost, e.g. source files -> bytes to hash).

    Longest-processing-time first: units by decreasing work (then by number), each to the
    rank with the least work so far (ties: fewer units, then the lower rank). With equal
    MoE layers this deals them out round-robin; the busiest rank has at most one unit's
    work more than the least busy.
    """
    if world < 1:
        raise ValueError(f"world size {world} must be at least 1")
    load = [0] * world
    count = [0] * world
    owner: dict[int, int] = {}
    for unit in sorted(work, key=lambda u: (-work[u], u)):
        r = min(range(world), key=lambda r: (load[r], count[r], r))
        owner[unit] = r
        load[r] += work[unit]
        count[r] += 1
    return owner


def per_projection(source, fn, progress, parallel=None, task: str = "allocate") -> dict:
    """``{(layer, projection): fn(layer, projection)}`` for every MoE layer and projection of
    ``source``. Under torchrun (``parallel`` of several ranks) each rank computes the layers it
    decomposes (:func:`assign_units`) and the results are gathered, so every rank returns all
    of them; progress is reported as ``task``."""
    from tuckerize.arch import PROJECTIONS

    layers = list(source.spec.moe_layers)
    if parallel is not None and parallel.world > 1:
        owner = assign_units(unit_work(source), parallel.world)
        layers = [layer for layer in layers if owner[layer + 1] == parallel.rank]
    out = {}
    progress.start(task, len(layers) * len(PROJECTIONS))
    for layer in layers:
        for proj in PROJECTIONS:
            out[(layer, proj)] = fn(layer, proj)
            progress.advance(task, 1, layer=layer, projection=proj)
    progress.finish(task)
    if parallel is not None and parallel.world > 1:
        import torch.distributed as dist

        parts: list = [None] * parallel.world
        dist.all_gather_object(parts, out, group=parallel.group)
        merged = {k: v for part in parts for k, v in part.items()}
        out = {(layer, proj): merged[(layer, proj)] for layer in source.spec.moe_layers for proj in PROJECTIONS}
    return out


def unit_work(source) -> dict[int, int]:
    """unit -> routed-expert tensors of :class:`tuckerize.compress.source.SourceModel` ``source``."""
    from tuckerize.checkpoint import layer_of

    work = {u: 0 for u in source.units_of}
    for name in source.replaced:
        layer = layer_of(name)
        work[0 if layer is None else layer + 1] = work.get(0 if layer is None else layer + 1, 0) + 1
    return work

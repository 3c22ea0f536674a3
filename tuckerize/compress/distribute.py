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


def unit_work(source) -> dict[int, int]:
    """unit -> routed-expert tensors of :class:`tuckerize.compress.source.SourceModel` ``source``."""
    from tuckerize.checkpoint import layer_of

    work = {u: 0 for u in source.units_of}
    for name in source.replaced:
        layer = layer_of(name)
        work[0 if layer is None else layer + 1] = work.get(0 if layer is None else layer + 1, 0) + 1
    return work

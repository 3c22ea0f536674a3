"""Storage for a byte budget (``--bytes``): one form per layer and projection, chosen together.

Every (layer, projection) has a list of candidate :class:`Option` s, each a stored form with
its exact stored bytes (codes, float16 scales and zeros, shapes: as the manifest counts them)
and its estimated squared output error, relative to the projection's own output energy
(:mod:`tuckerize.decompose.estimate`; every projection's relative error counts the same, as
``normalise="relative"`` of :mod:`tuckerize.allocate`). Forms:

``tucker``       Tucker factors and per-expert cores at ranks ``(E, r_H, r_I)``, stored as
                 ``storage`` (e.g. ``int8,core=int4``);
``base``         each expert quantised (``bits``, ``group``; GPTQ with the statistics);
``base+tucker``  the base plus a shared Tucker residual at ``(E, r_H, r_I)``.

Choosing one option per key to minimise the summed error within the budget is a
multiple-choice knapsack. :func:`choose` solves its convex relaxation greedily: each key's
options are reduced to the lower convex hull of (bytes, error) and the keys start at their
cheapest hull point; then the single hull step (one key to its next hull point) with the
largest error decrease per byte that still fits is taken, repeatedly, until none fits (the
classic greedy: exact at the breakpoints of the relaxation, within one step of the largest
key otherwise); a last pass moves a key to any option, hull or not, that lowers its error
within the bytes left. A budget below the sum of the cheapest options is refused, naming
that sum (the smallest feasible budget).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from tuckerize.errors import RankError

Key = tuple[int, str]  # (layer, projection)
FORMS = ("tucker", "base", "base+tucker")


@dataclass(frozen=True)
class Option:
    """One stored form of a projection: ``form`` (:data:`FORMS`), its stored ``bytes``, the
    estimated relative squared output ``error``, ``ranks`` ``(r_E, r_H, r_I)`` of the Tucker
    part (None for ``base``), ``base`` ``(bits, group)`` (None for ``tucker``) and the
    Tucker part's ``storage`` (``"int8,core=int4"``; None without one)."""

    form: str
    bytes: int
    error: float
    ranks: tuple[int, int, int] | None = None
    base: tuple[int, int] | None = None
    storage: str | None = None

    def describe(self) -> str:
        parts = []
        if self.base is not None:
            parts.append(f"int{self.base[0]} g{self.base[1]} base")
        if self.ranks is not None:
            parts.append(f"Tucker {','.join(map(str, self.ranks))} {self.storage}")
        return " + ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {"form": self.form, "bytes": self.bytes, "estimated_error": self.error,
                "ranks": list(self.ranks) if self.ranks is not None else None,
                "base": {"bits": self.base[0], "group": self.base[1]} if self.base is not None else None,
                "storage": self.storage}


def hull(options: Sequence[Option]) -> list[Option]:
    """The lower convex hull of ``options`` in (bytes, error), cheapest first: error strictly
    decreasing, and the decrease per byte shrinking from one point to the next."""
    pts: list[Option] = []
    for o in sorted(options, key=lambda o: (o.bytes, o.error)):
        if pts and o.error >= pts[-1].error:
            continue  # dominated: more bytes, no less error
        while len(pts) >= 2:
            a, b = pts[-2], pts[-1]
            # b is above the segment a-o: drop it
            if (b.error - a.error) * (o.bytes - a.bytes) >= (o.error - a.error) * (b.bytes - a.bytes):
                pts.pop()
            else:
                break
        pts.append(o)
    return pts


@dataclass
class Choice:
    """What :func:`choose` returns: the option of every key, the bytes used and the budget."""

    options: dict[Key, Option]
    used: int
    budget: int
    minimum: int
    estimated_error: float = field(default=0.0)


def smallest(options: Mapping[Key, Sequence[Option]]) -> int:
    """The bytes of the cheapest option of every key, summed: the smallest feasible budget."""
    return sum(min(o.bytes for o in opts) for opts in options.values())


def choose(options: Mapping[Key, Sequence[Option]], budget: int, what: str = "--bytes",
           unit=lambda b: f"{b:,} bytes") -> Choice:
    """One option per key with total bytes <= ``budget`` (module docstring); ``what`` and
    ``unit`` (bytes -> text) word the refusal of a budget below the smallest."""
    if not options or any(not opts for opts in options.values()):
        raise ValueError("every key needs at least one option")
    minimum = smallest(options)
    if budget < minimum:
        raise RankError(f"{what}: a budget of {unit(budget)} is below the smallest storable form of the routed "
                        f"experts; the smallest feasible budget is {unit(minimum)}")
    hulls = {k: hull(opts) for k, opts in options.items()}
    at = {k: 0 for k in hulls}
    used = sum(h[0].bytes for h in hulls.values())
    heap: list[tuple[float, int, Key]] = []
    counter = 0

    def push(k: Key) -> None:
        nonlocal counter
        h, i = hulls[k], at[k]
        if i + 1 < len(h):
            gain = h[i].error - h[i + 1].error
            cost = h[i + 1].bytes - h[i].bytes
            counter += 1
            heapq.heappush(heap, (-gain / max(cost, 1), counter, k))

    for k in sorted(hulls):
        push(k)
    while heap:
        _, _, k = heapq.heappop(heap)
        h, i = hulls[k], at[k]
        cost = h[i + 1].bytes - h[i].bytes
        if used + cost > budget:
            continue  # this key's later steps are dearer per byte and larger; others may fit
        at[k] = i + 1
        used += cost
        push(k)
    chosen = {k: hulls[k][at[k]] for k in hulls}
    # last pass: any option (hull or not) that lowers a key's error within the bytes left
    improved, rounds = True, 0
    while improved and rounds < 4 * len(options):
        improved, rounds = False, rounds + 1
        best = None
        for k, opts in options.items():
            cur = chosen[k]
            for o in opts:
                if o.error < cur.error and used - cur.bytes + o.bytes <= budget:
                    gain = cur.error - o.error
                    if best is None or gain > best[0]:
                        best = (gain, k, o)
        if best is not None:
            _, k, o = best
            used += o.bytes - chosen[k].bytes
            chosen[k] = o
            improved = True
    return Choice(options=dict(sorted(chosen.items())), used=used, budget=budget, minimum=minimum,
                  estimated_error=sum(o.error for o in chosen.values()))


__all__ = ["Option", "Choice", "choose", "hull", "smallest", "FORMS"]

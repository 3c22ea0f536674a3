"""Rank allocation to a parameter budget.

Budget: ``--ratio f`` keeps the fraction f of the routed experts' parameters
(``3 E H I`` per MoE layer), ``--params N`` keeps N of them. A projection at ranks
``(r_E, r_H, r_I)`` costs ``E r_E + H r_H + I r_I + r_E r_H r_I`` parameters.

Sensitivity: the eigenvalues ``lambda_n`` of each mode's Gram matrix of the (whitened)
expert tensor (:func:`tuckerize.decompose.whiten.mode_spectra`). Truncating mode n to
rank r discards ``tail_n(r) = sum_{i >= r} lambda_n[i]``; the ST-HOSVD error is at most
``sum_n tail_n(r_n)``, which is the error model here. With whitening, these are
calibration-set output errors. Each tensor's error is divided by its energy
(``normalise="relative"``: every projection's relative output error counts the same),
or taken as is (``"absolute"``); the measured choice is the default (BENCHMARKS.md).

Greedy marginal allocation: all tensors start at the smallest ranks; repeatedly, the
single rank step (one mode of one tensor) with the largest error decrease per added
parameter that still fits the budget is taken, until none fits. Error tails are convex
in the rank, so this is the classic greedy for a separable convex objective; the
parameter cost is not separable (the core term), which is why each tensor's candidate
steps are re-priced after each of its steps. Ranks move in steps of 1 for dimensions up
to 256 and of 8 above (matrix-unit friendly ranks on large models); the result uses the
budget to within one step of the largest tensor, far inside 1% for any real model.

``expert_rank="full"`` keeps ``r_E = E`` (no expert-mode compression; measured better on
the demo models), ``"auto"`` lets the greedy choose r_E as well.
"""

from __future__ import annotations

import heapq
import math
from typing import Mapping, Sequence

import torch

from tuckerize.arch import PROJECTIONS
from tuckerize.errors import RankError
from tuckerize.ranks import RankPlan, Ranks

Key = tuple[int, str]  # (layer, projection)


def tucker_params(shape: Sequence[int], ranks: Sequence[int]) -> int:
    E, H, I = shape
    rE, rH, rI = ranks
    return E * rE + H * rH + I * rI + rE * rH * rI


def dense_params(shape: Sequence[int]) -> int:
    return math.prod(shape)


def check_expert_rank(mode: str) -> None:
    if mode not in ("full", "auto"):
        raise RankError(f"expert rank {mode!r} is not 'full' (r_E = number of experts) or 'auto'")


def check_budget(ratio: float | None, params: int | None) -> None:
    """The rule for ``--ratio``/``--params`` that needs no model: ratio in (0, 1], params >= 1."""
    if ratio is not None and (not (0.0 < ratio <= 1.0) or math.isnan(ratio)):
        raise RankError(f"--ratio {ratio} is outside (0, 1]; it is the fraction of expert parameters kept, e.g. 0.75")
    if params is not None and params < 1:
        raise RankError(f"--params {params} must be a positive number of routed-expert parameters to keep")


def expert_budget(shape: Sequence[int], n_tensors: int, *, ratio: float | None = None,
                  params: int | None = None, expert_rank: str = "full") -> int:
    """Parameters to keep over ``n_tensors`` stacked projections of ``shape``; a budget
    below the smallest ranks :func:`allocate` starts from is refused here, before any work."""
    total = dense_params(shape) * n_tensors
    if (ratio is None) == (params is None):
        raise RankError("give exactly one of --ratio (fraction of expert parameters kept) or --params N")
    check_budget(ratio, params)
    check_expert_rank(expert_rank)
    if ratio is not None:
        budget = int(round(ratio * total))
    else:
        assert params is not None
        if params > total:
            raise RankError(f"--params {params} is outside 1..{total:,} (the routed experts' parameter count)")
        budget = int(params)
    _check_fits(shape, n_tensors, budget, expert_rank)
    return budget


def _start_ranks(shape: Sequence[int], steps: Sequence[int], expert_rank: str) -> list[int]:
    """The smallest ranks of the greedy: from (1, 1, 1) no single step would be useful
    (r_n <= product of the others)."""
    r = [min(max(2, steps[n]), shape[n]) for n in range(3)]
    if expert_rank == "full":
        r[0] = shape[0]
    return r


def _check_fits(shape: Sequence[int], n_tensors: int, budget: int, expert_rank: str,
                steps: Sequence[int] | None = None) -> None:
    steps = tuple(steps) if steps is not None else tuple(default_step(d) for d in shape)
    used = n_tensors * tucker_params(shape, _start_ranks(shape, steps, expert_rank))
    if used > budget:
        raise RankError(
            f"a budget of {budget:,} expert parameters is below the smallest ranks' {used:,}; "
            "raise --ratio/--params" + (" or let the expert rank shrink" if expert_rank == "full" else "")
        )


def default_step(dim: int) -> int:
    return 1 if dim <= 256 else 8


def _useful(r: Sequence[int], n: int) -> bool:
    """Rank r_n beyond the product of the other ranks adds nothing to a Tucker model."""
    return r[n] <= math.prod(r[m] for m in range(3) if m != n)


def allocate(
    spectra: Mapping[Key, Sequence[torch.Tensor]],
    shape: Sequence[int],
    budget: int,
    *,
    expert_rank: str = "full",
    normalise: str = "relative",
    steps: Sequence[int] | None = None,
) -> dict[Key, Ranks]:
    """Ranks per (layer, projection) with total parameters <= ``budget`` (see module docstring)."""
    check_expert_rank(expert_rank)
    if normalise not in ("relative", "absolute", "layer"):
        raise RankError(f"normalisation {normalise!r} is not 'relative', 'absolute' or 'layer'")
    shape = tuple(int(d) for d in shape)
    steps = tuple(steps) if steps is not None else tuple(default_step(d) for d in shape)
    keys = sorted(spectra)
    tails: dict[Key, list[list[float]]] = {}
    weight: dict[Key, float] = {}
    for k in keys:
        per_mode = []
        for n, lam in enumerate(spectra[k]):
            lam = lam.to(torch.float64).clamp_min(0.0)
            if lam.numel() != shape[n]:
                raise ValueError(f"spectrum of mode {n} of {k} has {lam.numel()} values, dimension {shape[n]}")
            # tail[r] = sum(lam[r:]), r = 0..d
            tail = torch.cat([lam.flip(0).cumsum(0).flip(0), torch.zeros(1, dtype=torch.float64)])
            per_mode.append(tail.tolist())
        tails[k] = per_mode
    for k in keys:
        # a tensor's energy is the sum of any mode's eigenvalues (tail at rank 0)
        ref = (k[0], "down") if normalise == "layer" and (k[0], "down") in tails else k
        energy = max(tails[ref][n][0] for n in range(3))
        weight[k] = (1.0 / energy if energy > 0 else 0.0) if normalise in ("relative", "layer") else 1.0

    ranks: dict[Key, list[int]] = {k: _start_ranks(shape, steps, expert_rank) for k in keys}
    _check_fits(shape, len(keys), budget, expert_rank, steps)
    used = sum(tucker_params(shape, r) for r in ranks.values())
    modes = (1, 2) if expert_rank == "full" else (0, 1, 2)
    version = {k: 0 for k in keys}
    heap: list[tuple[float, int, int, Key, int]] = []
    counter = 0

    def push(k: Key) -> None:
        nonlocal counter
        r = ranks[k]
        base = tucker_params(shape, r)
        for n in modes:
            if r[n] >= shape[n]:
                continue
            new = list(r)
            new[n] = min(shape[n], r[n] + steps[n])
            if not _useful(new, n):
                continue
            gain = weight[k] * (tails[k][n][r[n]] - tails[k][n][new[n]])
            cost = tucker_params(shape, new) - base
            counter += 1
            heapq.heappush(heap, (-gain / max(cost, 1), counter, version[k], k, n))

    for k in keys:
        push(k)
    while heap:
        _, _, ver, k, n = heapq.heappop(heap)
        if ver != version[k]:
            continue
        r = ranks[k]
        new = list(r)
        new[n] = min(shape[n], r[n] + steps[n])
        cost = tucker_params(shape, new) - tucker_params(shape, r)
        if used + cost > budget:
            continue  # does not fit; cheaper steps elsewhere may
        ranks[k] = new
        used += cost
        version[k] += 1
        push(k)
    return {k: (r[0], r[1], r[2]) for k, r in ranks.items()}


def uniform_ranks(shape: Sequence[int], n_tensors: int, budget: int, *, expert_rank: int | None = None) -> Ranks:
    """One triple for every tensor, within the budget, as close to it as possible, with
    r_H/H and r_I/I as equal as possible (r_E = E unless given)."""
    E, H, I = shape
    rE = E if expert_rank is None else int(expert_rank)
    best: tuple[float, float, Ranks] | None = None
    for rH in range(1, H + 1):
        # largest rI with n * params <= budget
        per = budget // n_tensors - E * rE - H * rH
        rI = min(I, per // (I + rE * rH)) if per > 0 else 0
        if rI < 1:
            continue
        for cand in {rI, max(1, rI - 1)}:
            used = n_tensors * tucker_params(shape, (rE, rH, cand))
            short = (budget - used) / budget
            if short > 0.01 or used > budget:
                continue
            key = (abs(rH / H - cand / I), short)
            if best is None or key < best[:2]:
                best = (key[0], key[1], (rE, rH, cand))
    if best is None:
        raise RankError(f"no uniform ranks with r_E={rE} meet a budget of {budget:,} parameters within 1%")
    return best[2]


def plan_from_ranks(ranks: Mapping[Key, Ranks], source: str = "allocated") -> RankPlan:
    """A :class:`RankPlan` with one entry per layer and projection (layers whose three
    projections agree get one triple)."""
    plan = RankPlan(source=source)
    layers = sorted({k[0] for k in ranks})
    for layer in layers:
        triples = [ranks[(layer, p)] for p in PROJECTIONS]
        if all(t == triples[0] for t in triples):
            plan.layers[layer] = tuple(triples[0])  # type: ignore[assignment]
        else:
            for p in PROJECTIONS:
                plan.layer_projections[(layer, p)] = tuple(ranks[(layer, p)])  # type: ignore[assignment]
    return plan


def plan_params(plan: RankPlan, moe_layers: Sequence[int], shape: Sequence[int]) -> int:
    """Routed-expert parameters of ``plan`` over all MoE layers and projections."""
    return sum(tucker_params(shape, plan.ranks_for(L, p)) for L in moe_layers for p in PROJECTIONS)


__all__ = ["allocate", "uniform_ranks", "expert_budget", "check_budget", "check_expert_rank", "plan_from_ranks",
           "plan_params", "tucker_params",
           "dense_params", "default_step"]

"""The Tucker experts' forward is what a CUDA graph can capture: static shapes, no host
synchronisation, at every token count up to vLLM's largest capture size (512), in every
layout, on every rank, with experts assigned by load, at the serving dtypes.

Two checks, each over the same cases (layout, world size, rank, explicit experts):

* ``torch.compile(fullgraph=True, dynamic=True)`` of the module's forward: a graph break, a
  host read or a data-dependent shape fails the compile. One compile per case, reused for
  1, 3, 16, 64 and 512 tokens (torch specialises 1, so two graphs); outputs equal eager and
  an independent float64 reference (dense experts formed from the factors by one einsum,
  every pair computed in float64), relative-norm tolerance. The matrix runs on the
  ``aot_eager`` backend (dynamo and AOT tracing with fake tensors: everything that decides
  whether the forward is static; no C++ compile), one case on ``inductor`` (the default).
* a :class:`sync_guard.SyncGuard` over the eager forward: no forbidden op, and three very
  different routings (spread, all pairs on one expert, none on this rank) run the same ops
  on the same shapes, in float32, bfloat16 and float16.

A rank is run alone with :class:`LocalCollectives`: its all-reduce returns its own partial
(the reference is then that rank's share of the output) and its all-gather fills the other
ranks' columns from its own (deterministic, so compiled and eager agree; the hybrid layouts'
cross-rank result is checked with real collectives in test_tucker_experts.py and
test_distributed.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import pytest
import torch

import tucker_refs as R
from sync_guard import guarded
from tuckerize.parallel import EXPERT_SPLIT_LAYOUTS, ParallelContext, split_range
from tuckerize.runtime.tucker_experts import TuckerExperts

E, H, I, K = 8, 32, 18, 2  # I = 18: the grouped kernel pads it to 20 (16 bytes of float32)
SIZES = (1, 3, 16, 64, 512)
ASSIGNED = [[0, 5, 7], [2, 3], [1, 4, 6]]  # experts by load, 3 ranks

#: (layout, world, rank, experts assigned by load)
CASES = [("intermediate", 1, 0, False), ("intermediate", 2, 1, False),
         ("expert", 3, 0, False), ("expert", 3, 2, False), ("expert", 3, 1, True),
         ("hybrid", 2, 0, False), ("hybrid", 3, 2, True), ("hybrid-replicated-out", 2, 1, False)]


def _id(case) -> str:
    layout, world, rank, assigned = case
    return f"{layout}-r{rank}of{world}" + ("-by-load" if assigned else "")


@dataclass(frozen=True)
class LocalCollectives(ParallelContext):
    """This rank alone: all-reduce returns its own tensor; all-gather fills every other
    rank's share with this rank's values (truncated or tiled to its size)."""

    def all_reduce(self, tensor):
        return tensor

    def all_gather_cat(self, tensor, sizes, dim=-1):
        if self.world == 1:
            return tensor
        reps = -(-max(sizes) // tensor.shape[dim])
        tiled = torch.cat([tensor] * reps, dim=dim) if reps > 1 else tensor
        return torch.cat([tensor if r == self.rank else tiled.narrow(dim, 0, n) for r, n in enumerate(sizes)], dim=dim)


@pytest.fixture(scope="module")
def factors():
    return R.random_factors(E, H, I, R.PLAN, seed=21)  # PLAN's ranks need padding for grouped_mm


def _module(factors, case, dtype=torch.float32) -> TuckerExperts:
    layout, world, rank, assigned = case
    m = TuckerExperts(E, H, I, R.PLAN, layout=layout, parallel=LocalCollectives(rank=rank, world=world),
                      experts=ASSIGNED[rank] if assigned else None, dtype=dtype)
    m.load_factors(factors)
    return m


def _inputs(T: int, seed: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g).to(dtype)
    idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    w = (torch.rand(T, K, generator=g) + 0.1).to(dtype)
    return x, idx, w


def _reference(factors, case, x, idx, w) -> torch.Tensor:
    """This rank's share of the output (its partial, unreduced, then U_H,d^T) in float64:
    dense experts formed from the factors, every pair at once (an einsum)."""
    layout, world, rank, assigned = case
    dense = R.dense_from_flat({k: v.double() for k, v in factors.items()})
    if layout == "intermediate":
        i0, i1 = split_range(I, world, rank)
        dense = {p: d[:, :, i0:i1] for p, d in dense.items()}
    w = w.double()
    if layout in EXPERT_SPLIT_LAYOUTS:
        mine = ASSIGNED[rank] if assigned else list(range(*split_range(E, world, rank)))
        w = w * torch.isin(idx, torch.tensor(mine)).double()
    x = x.double()
    g = torch.einsum("th,tkhi->tki", x, dense["gate"][idx])
    u = torch.einsum("th,tkhi->tki", x, dense["up"][idx])
    a = torch.nn.functional.silu(g) * u
    return torch.einsum("tki,tkhi,tk->th", a, dense["down"][idx], w)


def _close(ref: torch.Tensor, got: torch.Tensor, tol: float = 1e-5) -> bool:
    """Relative-norm agreement; a rank none of whose experts was routed must give exact zeros."""
    if float(ref.double().norm()) == 0.0:
        return float(got.double().abs().max()) == 0.0
    return R.rel_err(ref, got) < tol


def _check_compiled(factors, case, backend: str, dtype=torch.float32) -> float:
    torch._dynamo.reset()
    m = _module(factors, case, dtype)
    compiled = torch.compile(m, fullgraph=True, dynamic=True, backend=backend)
    tol = 1e-5 if dtype == torch.float32 else 3e-2  # 16-bit: a few roundings of 8-11 mantissa bits
    start = time.perf_counter()
    for T in SIZES:
        x, idx, w = _inputs(T, seed=T, dtype=dtype)
        with torch.no_grad():
            got, eager = compiled(x, idx, w), m(x, idx, w)
        ref = _reference(factors, case, x.float(), idx, w.float())
        assert got.shape == (T, H) and got.dtype == dtype and torch.isfinite(got).all()
        assert _close(eager, got, 1e-5 if dtype == torch.float32 else 1e-2), (case, T)
        if case[0].startswith("hybrid") and case[1] > 1:
            continue  # LocalCollectives' all-gather is not the true one: compiled == eager only
        assert _close(ref, got, tol), (case, T)
    return time.perf_counter() - start


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_compiles_fullgraph_dynamic_and_equals_eager(factors, case):
    _check_compiled(factors, case, "aot_eager")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_compiles_in_serving_dtypes(factors, dtype):
    """bfloat16 goes through torch's grouped_mm (which torch.compile traces), float16 through
    ours (torch's meta function accepts bfloat16 only)."""
    _check_compiled(factors, ("expert", 3, 1, True), "aot_eager", dtype)
    _check_compiled(factors, ("intermediate", 1, 0, False), "aot_eager", dtype)


def test_compiles_with_inductor(factors):
    """The default backend too (C++ code generation on the CPU: about 10-20 s), on an
    expert-split rank with experts assigned by load (the masked, bounded products)."""
    _check_compiled(factors, ("expert", 3, 1, True), "inductor")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=_id)
def test_no_host_sync_and_same_ops_for_any_routing(factors, case, dtype):
    m = _module(factors, case, dtype)
    layout, world, rank, assigned = case
    mine = ASSIGNED[rank] if assigned else list(range(*split_range(E, world, rank))) \
        if layout in EXPERT_SPLIT_LAYOUTS else list(range(E))
    others = [e for e in range(E) if e not in mine] or mine  # no other rank's expert: its own
    for T in SIZES:
        x, spread, w = _inputs(T, seed=T, dtype=dtype)
        one_expert = torch.tensor([mine[0], mine[0]]).repeat(T, 1)
        none_here = torch.tensor([others[0], others[-1]]).repeat(T, 1)
        traces = []
        for idx in (spread, one_expert, none_here):
            guard = guarded(m, x, idx, w)
            assert guard.violations == [], (case, T, guard.violations)
            traces.append(guard.trace)
        assert traces[0] == traces[1] == traces[2], (case, T)


def test_guard_can_fail():
    """The guard flags what it must (so the checks above can fail)."""
    t = torch.arange(6)
    for fn, flag in [(lambda: t.tolist(), "tolist"), (lambda: t.sum().item(), "_local_scalar_dense"),
                     (lambda: t.nonzero(), "nonzero"), (lambda: t[t > 2], "index[bool mask]"),
                     (lambda: torch.bincount(t), "bincount"), (lambda: t.unique(), "unique"),
                     (lambda: torch.repeat_interleave(t), "repeat_interleave"),
                     (lambda: t.masked_select(t > 1), "masked_select")]:
        guard = guarded(fn)
        assert any(flag in v for v in guard.violations), (flag, guard.violations)
    assert guarded(lambda: t[torch.tensor([0, 2])] * 2).violations == []
    assert guarded(lambda: torch.repeat_interleave(t, t, output_size=15)).violations == []
    assert torch.Tensor.tolist(t) == list(range(6))  # restored

"""The byte allocator (tuckerize.allocate_bytes) against brute force on small problems."""

from __future__ import annotations

import itertools
import random

import pytest

from tuckerize.allocate_bytes import Option, choose, hull, smallest
from tuckerize.errors import RankError


def _problem(seed: int, keys: int = 3, per: int = 5):
    rnd = random.Random(seed)
    out = {}
    for k in range(keys):
        opts = []
        for _ in range(per):
            b = rnd.randint(10, 100)
            opts.append(Option("base", b, rnd.random() * 100.0 / b, base=(2, 128)))
        out[(k, "gate")] = opts
    return out


def _brute(options, budget):
    best = None
    for combo in itertools.product(*options.values()):
        b = sum(o.bytes for o in combo)
        if b <= budget:
            e = sum(o.error for o in combo)
            best = e if best is None or e < best else best
    return best


def test_hull_is_lower_convex_and_decreasing():
    opts = [Option("tucker", b, e) for b, e in [(10, 9.0), (20, 5.0), (30, 4.5), (40, 1.0), (25, 6.0), (50, 2.0)]]
    h = hull(opts)
    assert [(o.bytes, o.error) for o in h] == [(10, 9.0), (20, 5.0), (40, 1.0)]


@pytest.mark.parametrize("seed", range(12))
def test_greedy_is_feasible_and_near_brute_force(seed):
    options = _problem(seed)
    lo, hi = smallest(options), sum(max(o.bytes for o in v) for v in options.values())
    for budget in range(lo, hi + 1, 7):
        got = choose(options, budget)
        assert got.used <= budget and got.used == sum(o.bytes for o in got.options.values())
        opt = _brute(options, budget)
        steps = [a.error - b.error for h in map(hull, options.values()) for a, b in zip(h, h[1:])]
        assert opt - 1e-12 <= got.estimated_error <= opt + max(steps, default=0.0) + 1e-12


def test_exact_on_a_hand_example():
    options = {(0, "gate"): [Option("base", 10, 5.0), Option("base", 20, 1.0)],
               (0, "down"): [Option("base", 10, 3.0), Option("base", 30, 0.0)]}
    assert choose(options, 20).estimated_error == 8.0
    assert choose(options, 30).options[(0, "gate")].bytes == 20  # 4 per 10 bytes beats 3 per 20
    assert choose(options, 50).estimated_error == 1.0


def test_budget_below_the_smallest_form_names_it():
    options = _problem(0)
    with pytest.raises(RankError, match=f"smallest feasible budget is {smallest(options):,} bytes"):
        choose(options, smallest(options) - 1)

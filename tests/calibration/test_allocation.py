"""Rank allocation from calibration spectra (tuckerize.allocate with calibration statistics)."""

from __future__ import annotations

import json

import pytest
import torch
from calibration_common import DEMO, SAMPLES, cli
from safetensors.torch import load_file

from tuckerize.allocate import allocate, expert_budget, tucker_params, uniform_ranks
from tuckerize.compress import decompose_checkpoint
from tuckerize.errors import RankError
from tuckerize.ranks import load_plan
from tuckerize.text import read_text


def test_allocate_meets_budget_on_synthetic_spectra():
    g = torch.Generator().manual_seed(0)
    shape = (8, 64, 32)
    spectra = {(L, p): [torch.rand(d, generator=g).sort(descending=True).values ** (L + 2) for d in shape]
               for L in range(3) for p in ("gate", "up", "down")}
    for ratio in (0.1, 0.3, 0.5, 0.75, 0.9):
        budget = expert_budget(shape, 9, ratio=ratio)
        for mode in ("full", "auto"):
            ranks = allocate(spectra, shape, budget, expert_rank=mode)
            used = sum(tucker_params(shape, r) for r in ranks.values())
            assert 0.99 * budget <= used <= budget, (ratio, mode, used, budget)
            if mode == "full":
                assert all(r[0] == 8 for r in ranks.values())
    u = uniform_ranks(shape, 9, budget)
    assert 0.99 * budget <= 9 * tucker_params(shape, u) <= budget
    with pytest.raises(RankError, match="below the smallest"):
        allocate(spectra, shape, 100)


def test_allocated_plan_meets_budget_and_round_trips_through_config(demo_runs, tmp_path):
    stats = demo_runs["white"]
    plan_file = tmp_path / "plan.yaml"
    m = decompose_checkpoint(str(DEMO), tmp_path / "alloc", ratio=0.6, stats=stats, save_config=plan_file)
    budget = round(0.6 * m["params"]["experts_before"])
    assert 0.99 * budget <= m["params"]["experts_after"] <= budget
    assert m["allocation"]["config"] == str(plan_file) and (tmp_path / "alloc" / "rank_plan.yaml").is_file()
    plan = load_plan(plan_file)
    for t in m["tensors"]:
        assert list(plan.ranks_for(t["layer"], t["projection"])) == t["ranks"]
    assert len({tuple(t["ranks"]) for t in m["tensors"]}) > 1  # not uniform
    again = decompose_checkpoint(str(DEMO), tmp_path / "again", config=plan_file, stats=stats)
    assert [t["ranks"] for t in again["tensors"]] == [t["ranks"] for t in m["tensors"]]
    a = load_file(str(tmp_path / "alloc" / "model-00002-of-00005.safetensors"))
    b = load_file(str(tmp_path / "again" / "model-00002-of-00005.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    plain = decompose_checkpoint(str(DEMO), tmp_path / "plain", ratio=0.6, save_config=tmp_path / "plain.yaml")
    assert 0.99 * budget <= plain["params"]["experts_after"] <= budget and "calibration" not in plain
    assert plain["allocation"]["spectra"] == "plain" and (tmp_path / "plain" / "rank_plan.yaml").is_file()
    by_params = decompose_checkpoint(str(DEMO), tmp_path / "p", params=500_000, stats=stats,
                                     save_config=tmp_path / "p.yaml")
    assert 495_000 <= by_params["params"]["experts_after"] <= 500_000


def test_plan_stays_in_the_output_folder(demo_runs, tmp_path, monkeypatch):
    """Without --save-config an allocated plan is written to the output folder only
    (rank_plan.yaml): nothing lands in the working directory."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    r = cli("--ratio", "0.9", "--calibration", str(demo_runs["white"]), "--out", str(tmp_path / "o"))
    assert r.exit_code == 0, r.output
    assert list(cwd.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cwd", "o"]
    assert f"rank plan written to {(tmp_path / 'o' / 'rank_plan.yaml').resolve()} (reuse with --config)" in r.stderr
    m = json.loads((tmp_path / "o" / "tuckerize_manifest.json").read_text())
    assert m["allocation"]["config"] is None
    plan = load_plan(tmp_path / "o" / "rank_plan.yaml")
    assert [list(plan.ranks_for(t["layer"], t["projection"])) for t in m["tensors"]] == [t["ranks"] for t in m["tensors"]]
    # the default output folder is made in the working directory, and holds the plan too
    r = cli("--ratio", "0.9", "--calibration", str(demo_runs["white"]))
    assert r.exit_code == 0, r.output
    assert [p.name for p in cwd.iterdir()] == ["model-tucker-keep0.9"]
    assert (cwd / "model-tucker-keep0.9" / "rank_plan.yaml").read_text() == (tmp_path / "o" / "rank_plan.yaml").read_text()


def test_cli_allocates_from_saved_statistics(tmp_path, demo_runs):
    r = cli("--ratio", "0.7", "--calibration", str(demo_runs["white"]), "--out", str(tmp_path / "p"),
            "--save-config", str(tmp_path / "p.yaml"), "--json")
    assert r.exit_code == 0, r.output
    m = json.loads(r.stdout)
    assert m["allocation"]["config"] == str(tmp_path / "p.yaml") and load_plan(tmp_path / "p.yaml")
    assert abs(m["params"]["experts_ratio"] - 0.7) < 0.007
    assert m["calibration"]["settings"]["samples"] == SAMPLES  # the settings of the reused statistics

"""Real tensor parallelism: gloo process groups of 2, 4 and 8 spawned workers.

Each worker opens the shard set that ``shard_checkpoint`` wrote (so it reads only its
rank's files), builds the MoE blocks of every MoE layer and runs them; every rank's
output must equal the single-process output of the unsharded Tucker checkpoint. One
process group per world size runs all cases (models x layouts) to keep the number of
spawned processes small. Models: the two embedded demo models (Qwen3-MoE and Mixtral,
decomposed here; Qwen3-MoE also with quantised factors) and a tiny one (Qwen2-MoE's shared
expert; I=18 splits unevenly).

The demo models have 4 attention heads, so no whole-model shard set exists for 8 ranks;
the 8-process case relabels their attention as 8 heads of 16 (4 key/value heads: every
tensor keeps its shape) and checks the MoE blocks, which do not depend on the heads.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import dist_helpers
import tucker_refs as R
from tuckerize.demo import DEMO_DIR
from tuckerize.runtime.loader import TensorSource, build_moe_block
from tuckerize.parallel import LAYOUTS, ParallelContext
from tuckerize.shard import shard_checkpoint

#: Tiny Qwen2-MoE (shared expert; I=18 splits unevenly over 4); the demo models cover Qwen3-MoE and Mixtral.
MODELS = {"qwen2_moe": {"moe_intermediate_size": 18}}
DEMOS = {"demo": DEMO_DIR, "demo-mixtral": DEMO_DIR.parent / "mixtral"}
TOL = 1e-5


def _eight_heads(tucker: Path, out: Path) -> Path:
    """A view of ``tucker`` whose config names 8 heads of 16 (4 key/value heads)."""
    out.mkdir()
    for f in tucker.iterdir():
        if f.name != "config.json":
            (out / f.name).symlink_to(f)
    cfg = json.loads((tucker / "config.json").read_text())
    assert cfg["num_attention_heads"] * (cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]) == 128
    cfg.update(num_attention_heads=8, num_key_value_heads=cfg["num_key_value_heads"] * 2, head_dim=16)
    (out / "config.json").write_text(json.dumps(cfg))
    return out


@pytest.fixture(scope="module")
def dist_runs(tucker_factory, tmp_path_factory):
    """Lazily, per world size: shard sets, one spawned gloo group, its outputs and the
    single-process references."""
    root = tmp_path_factory.mktemp("dist")
    tuckers = {arch: tucker_factory(arch, **ov)[1] for arch, ov in MODELS.items()}
    for name, folder in DEMOS.items():
        tuckers[name] = R.decompose_tiny(folder, root / f"{name}-tucker")
    # Factors stored quantised: the shard files keep int8/int4 codes where the split allows.
    tuckers["demo-int4"] = R.decompose_tiny(DEMOS["demo"], root / "demo-int4-tucker", factor_dtype="int8,core=int4")
    eight = {name: _eight_heads(tuckers[name], root / f"{name}-8heads") for name in DEMOS}
    shards: dict[tuple[str, int, str], Path] = {}

    def shard_dir(arch: str, tp: int, layout: str, load=None) -> Path:
        key = (arch, tp, layout + ("-balanced" if load else ""))
        if key not in shards:
            src = eight[arch] if tp == 8 else tuckers[arch]
            manifest = shard_checkpoint(src, tp, layout=layout, out=root / f"{arch}-tp{tp}-{key[2]}",
                                        expert_load=load)
            if load:  # the skewed load below must have moved experts
                assert all(a["assigned"] for a in manifest["expert_assignment"].values())
            shards[key] = Path(manifest["out"])
        return shards[key]

    runs: dict[int, dict] = {}

    def get(tp: int) -> dict:
        if tp in runs:
            return runs[tp]
        out = root / f"out-tp{tp}"
        out.mkdir()
        jobs, refs = [], {}
        models = {a: t for a, t in tuckers.items() if tp < 8 or a in DEMOS}
        for i, (arch, tucker) in enumerate(models.items()):
            source = TensorSource.open(tucker, parallel=ParallelContext())
            spec = source.spec
            x = torch.randn(3, 5, spec.hidden_size, generator=torch.Generator().manual_seed(10 + i))
            np.save(out / f"{arch}-x.npy", x.numpy())
            for layer in spec.moe_layers:
                block = build_moe_block(source, layer)
                with torch.no_grad():
                    refs[(arch, layer)] = block(x)
                    _, top_i = block.gate(x.reshape(-1, spec.hidden_size))
                # The routing reaches most experts, so every rank of the expert layout works.
                assert len(set(top_i.flatten().tolist())) >= spec.num_experts - 1
            for layout in LAYOUTS:
                jobs.append({"name": f"{arch}-{layout}", "arch": arch, "layout": layout,
                             "shard_dir": str(shard_dir(arch, tp, layout)),
                             "input": str(out / f"{arch}-x.npy"), "layers": list(spec.moe_layers)})
            if arch == "demo":  # experts assigned to ranks by a (skewed) measured load
                E = spec.num_experts
                load = {L: [50.0] * (E // tp) + [1.0] * (E - E // tp) for L in spec.moe_layers}
                jobs.append({"name": f"{arch}-hybrid-balanced", "arch": arch, "layout": "hybrid",
                             "shard_dir": str(shard_dir(arch, tp, "hybrid", load)),
                             "input": str(out / f"{arch}-x.npy"), "layers": list(spec.moe_layers)})
        # A shard set written for another world size must be refused, not hang.
        other = 4 if tp == 2 else 2
        jobs.append({"name": "wrong-world", "expect_error": True, "shard_dir": str(shard_dir("demo", other,
                                                                                              "intermediate"))})
        jobs.append({"name": "wrong-layout", "expect_error": True, "layout": "expert",
                     "shard_dir": str(shard_dir("demo", tp, "intermediate"))})
        (out / "jobs.json").write_text(json.dumps(jobs))
        dist_helpers.run_workers(dist_helpers.moe_block_worker, tp, args=(str(out / "jobs.json"), str(out)),
                                 timeout=150 if tp < 8 else 900)
        runs[tp] = {"out": out, "jobs": jobs, "refs": refs, "shards": shards}
        return runs[tp]

    return get


TPS = [2, 4, pytest.param(8, marks=pytest.mark.slow)]


@pytest.mark.parametrize("tp", TPS)
def test_every_rank_matches_single_process(dist_runs, tp):
    run = dist_runs(tp)
    out, refs = run["out"], run["refs"]
    checked = 0
    for job in run["jobs"]:
        if job.get("expect_error"):
            continue
        for layer in job["layers"]:
            ref = refs[(job["arch"], layer)]
            for rank in range(tp):
                got = torch.from_numpy(np.load(out / f"{job['name']}-L{layer}-r{rank}.npy"))
                err = R.rel_err(ref, got)
                assert err < TOL, f"{job['name']} layer {layer} rank {rank} of {tp}: relative error {err:.2e}"
                checked += 1
    jobs = [j for j in run["jobs"] if not j.get("expect_error")]
    assert {j["arch"] for j in jobs} >= set(DEMOS) and {j["layout"] for j in jobs} == set(LAYOUTS)
    assert checked == tp * sum(len(j["layers"]) for j in jobs) > 0


@pytest.mark.parametrize("tp", TPS)
def test_each_rank_reads_only_its_files(dist_runs, tp):
    run = dist_runs(tp)
    for job in run["jobs"]:
        if job.get("expect_error"):
            continue
        for rank in range(tp):
            info = json.loads((run["out"] / f"{job['name']}-r{rank}.json").read_text())
            assert (info["kind"], info["rank"], info["world"], info["layout"]) == ("shard", rank, tp, job["layout"])
            own = Path(job["shard_dir"]) / f"rank-{rank:05d}-of-{tp:05d}"
            assert Path(info["folder"]) == own
            assert info["opened"], "no file was read"
            assert all(Path(p).parent == own for p in info["opened"]), info["opened"]


@pytest.mark.parametrize("tp", [2, 4])
def test_mismatched_shard_set_reports_shard_error(dist_runs, tp):
    run = dist_runs(tp)
    other = 4 if tp == 2 else 2
    for rank in range(tp):
        report = json.loads((run["out"] / f"wrong-world-r{rank}.json").read_text())
        assert report["type"] == "ShardError", report
        assert f"tp={other}" in report["error"] and f"{tp} processes" in report["error"]
        report = json.loads((run["out"] / f"wrong-layout-r{rank}.json").read_text())
        assert report["type"] == "ShardError" and "layout" in report["error"], report


def test_worker_failure_is_reported_not_hung(tmp_path):
    """A rank that dies before a collective: the others fail (gloo timeout or peer loss)
    and run_workers raises within its deadline."""
    import time

    t0 = time.monotonic()
    with pytest.raises(Exception) as info:
        dist_helpers.run_workers(dist_helpers.failing_worker, 2, timeout=60)
    assert time.monotonic() - t0 < 60
    # Whichever rank torch reports first: rank 1's own error, or rank 0 losing its peer
    # (under load rank 0 can be first); either way a failure, reported before the deadline.
    msg = str(info.value)
    assert "rank 1 fails on purpose" in msg or "Process 0 terminated" in msg or "TimeoutError" in type(info.value).__name__



@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads thread names from /proc")
def test_leaving_the_group_frees_its_threads(tmp_path):
    """After leave_process_group no gloo thread is alive, even with torch._dynamo imported
    after the group was made (as transformers' AutoTokenizer does): a group left alive was
    destroyed during interpreter teardown, racing its threads (SIGABRT after a good run)."""
    dist_helpers.run_workers(dist_helpers.exit_worker, 2, args=(str(tmp_path),), timeout=120)
    for rank in range(2):
        report = json.loads((tmp_path / f"threads-r{rank}.json").read_text())
        assert report["sum"] == [2.0, 2.0] and report["after"] == 1
        assert not [t for t in report["threads"] if "gloo" in t], report["threads"]

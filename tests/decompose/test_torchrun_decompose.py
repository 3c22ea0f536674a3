"""``tuckerize decompose`` under real ``torchrun`` (gloo on CPU) on the demo models.

The output of 2 and 3 processes must be byte-identical to one process (every file's
sha256; the manifest without its timings and ``out``); a calibrated run with its windows
divided among 2 processes must equal one process up to summation order (same plan,
factors within 1e-6); a rank killed mid-run, then the run resumed with another number of
processes, must give the same bytes with no lock or journal left. Plus the pure
layer-to-rank assignment and the one-line refusal of method.refit under torchrun.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cli_helpers import output_contents

import dist_helpers
from tuckerize.compress import decompose_checkpoint
from tuckerize.compress.distribute import assign_units
from tuckerize.demo import DEMO_DIR

DEMOS = {"qwen3": DEMO_DIR, "mixtral": DEMO_DIR.parent / "mixtral"}
RANKS = "4,16,8"

#: The CLI; with KILL_RANK=r and KILL_AT=k, rank r SIGKILLs itself right after its k-th file write.
WRAPPER = r"""
import os, signal
import tuckerize.checkpoint as c
k, n = int(os.environ.get("KILL_AT", "0")), [0]
mine = os.environ.get("KILL_RANK") == os.environ.get("RANK")
real = c.write_bytes
def write_bytes(path, data):
    real(path, data)
    n[0] += 1
    if mine and n[0] == k:
        os.kill(os.getpid(), signal.SIGKILL)
c.write_bytes = write_bytes
from tuckerize.cli import app
app(prog_name="tuckerize")
"""


def _torchrun(nproc: int) -> list[str]:
    exe = Path(sys.executable).with_name("torchrun")
    launcher = [str(exe)] if exe.is_file() else [sys.executable, "-m", "torch.distributed.run"]
    return [*launcher, "--nproc_per_node", str(nproc), "--rdzv-backend=c10d",
            f"--rdzv-endpoint=127.0.0.1:{dist_helpers.free_port()}"]


def decompose(nproc: int, args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    full = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **env}
    full.pop("TUCKERIZE_DEBUG", None)
    entry = ["-c", WRAPPER] if nproc == 1 else [str(cwd / "wrapper.py")]
    (cwd / "wrapper.py").write_text(WRAPPER)
    cmd = ([sys.executable, *entry] if nproc == 1 else [*_torchrun(nproc), *entry]) + ["decompose", *args, "--json"]
    return subprocess.run(cmd, capture_output=True, text=True, env=full, timeout=300, cwd=cwd)


def contents(folder: Path) -> dict[str, str]:
    return output_contents(folder)


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> dict[str, dict[str, str]]:
    """Contents of a one-process run per demo model (the library call, in this process)."""
    ref = {}
    for name, path in DEMOS.items():
        out = tmp_path_factory.mktemp(name) / "out"
        decompose_checkpoint(str(path), out, ranks=RANKS)
        ref[name] = contents(out)
    return ref


def test_assign_units_balanced_and_complete():
    work = {0: 0, 1: 48, 2: 0, 3: 48, 4: 48, 5: 48, 6: 24}
    for world in (1, 2, 3, 4, 10):
        owner = assign_units(work, world)
        assert sorted(owner) == sorted(work)
        loads = [sum(w for u, w in work.items() if owner[u] == r) for r in range(world)]
        assert max(loads) - min(loads) <= max(work.values())
        assert owner == assign_units(dict(reversed(list(work.items()))), world)  # a function of the work only
    assert assign_units(work, 2) == {1: 0, 3: 1, 4: 0, 5: 1, 6: 0, 0: 1, 2: 1}
    with pytest.raises(ValueError):
        assign_units(work, 0)


@pytest.mark.parametrize("model", sorted(DEMOS))
@pytest.mark.parametrize("nproc", [2, 3])
def test_torchrun_equals_one_process(model, nproc, single, tmp_path):
    out = tmp_path / "out"
    r = decompose(nproc, ["--model", str(DEMOS[model]), "--ranks", RANKS, "--out", str(out)], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert contents(out) == single[model]
    manifest = json.loads(r.stdout)  # printed once, by rank 0
    assert manifest["out"] == str(out.resolve())


def test_two_nodes_equal_one_process(single, tmp_path):
    """Two torchrun agents, as on two nodes (``--nnodes 2``, one process each, one c10d
    rendezvous; both see the output folder as a shared filesystem would): the same bytes
    as one process. LOCAL_RANK is 0 on both, RANK 0 and 1."""
    out = tmp_path / "out"
    (tmp_path / "wrapper.py").write_text(WRAPPER)
    exe = Path(sys.executable).with_name("torchrun")
    launcher = [str(exe)] if exe.is_file() else [sys.executable, "-m", "torch.distributed.run"]
    port = dist_helpers.free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("TUCKERIZE_DEBUG", None)
    procs = []
    for node in range(2):
        cmd = [*launcher, "--nnodes", "2", "--node_rank", str(node), "--nproc_per_node", "1",
               "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id", "two-nodes",
               str(tmp_path / "wrapper.py"), "decompose", "--model", str(DEMOS["mixtral"]), "--ranks", RANKS,
               "--out", str(out), "--json"]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                      cwd=tmp_path))
    results = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, results):
        assert p.returncode == 0, err[-3000:]
    assert contents(out) == single["mixtral"]
    printed = [json.loads(o) for o, _ in results if o.strip()]  # rank 0's agent prints the manifest
    assert len(printed) == 1 and printed[0]["out"] == str(out.resolve())


def test_rank_killed_then_resumed_with_other_world(single, tmp_path):
    """Rank 1 of 2 dies after its second file write (a layer file and its journal entry);
    rank 0's layers are written too; the rerun with 3 processes keeps what verifies."""
    out = tmp_path / "out"
    args = ["--model", str(DEMOS["qwen3"]), "--ranks", RANKS, "--out", str(out)]
    r = decompose(2, args, tmp_path, KILL_RANK="1", KILL_AT="3")
    assert r.returncode != 0
    assert not (out / "tuckerize_manifest.json").exists()
    journal = json.loads((out / ".tuckerize-journal-rank-1.json").read_text())
    assert journal["files"], "rank 1 should have recorded a file before it was killed"
    r = decompose(3, args, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert contents(out) == single["qwen3"]
    left = [p.name for p in out.iterdir() if p.name.startswith(".tuckerize") or ".tmp-" in p.name]
    assert left == []
    # and once more with one process: everything is kept, nothing rewritten
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name.startswith("model-")}
    r = decompose(1, args, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name.startswith("model-")} == before


def test_refit_refused_under_torchrun(tmp_path):
    out = tmp_path / "out"
    (tmp_path / "refit.yaml").write_text("method:\n  refit: true\n")
    r = decompose(2, ["--model", str(DEMOS["qwen3"]), "--ranks", RANKS, "--out", str(out), "--calibration", "demo",
                      "--samples", "4", "--seqlen", "16", "--config", str(tmp_path / "refit.yaml")], tmp_path)
    assert r.returncode != 0
    lines = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    # the same line from each rank (torchrun may stop the second rank before it prints)
    assert 1 <= len(lines) <= 2 and len(set(lines)) == 1, r.stderr[-3000:]
    assert "method.refit" in lines[0] and "without torchrun" in lines[0]
    assert "tuckerize/" not in r.stderr  # no traceback of ours (torchrun prints its own ChildFailedError)


def _factors(folder: Path) -> dict:
    from safetensors.torch import load_file

    tensors = {}
    for p in sorted(folder.glob("model-*.safetensors")):
        tensors.update(load_file(str(p)))
    return tensors


def test_calibrated_two_processes_equal_one(tmp_path):
    """Windows divided among 2 ranks, statistics all-reduced: the same plan, factors equal up to
    summation order (relative difference < 1e-6)."""
    import torch

    args = ["--model", str(DEMOS["qwen3"]), "--calibration", "demo", "--samples", "16", "--seqlen", "32",
            "--ratio", "0.75"]
    outs = {}
    for nproc in (1, 2):
        outs[nproc] = tmp_path / f"out{nproc}"
        r = decompose(nproc, [*args, "--out", str(outs[nproc]), "--save-config", str(tmp_path / f"plan{nproc}.yaml")],
                      tmp_path)
        assert r.returncode == 0, r.stderr[-3000:]
    assert (outs[1] / "rank_plan.yaml").read_text() == (outs[2] / "rank_plan.yaml").read_text()
    one, two = _factors(outs[1]), _factors(outs[2])
    assert sorted(one) == sorted(two)
    factor_names = [n for n in one if n.endswith(("U_E", "U_H", "U_I", "core"))]
    assert factor_names
    for n in one:
        a, b = one[n].double(), two[n].double()
        if n in factor_names:
            assert torch.linalg.norm(a - b) <= 1e-6 * torch.linalg.norm(a), n
        else:
            assert torch.equal(one[n], two[n]), n
    m1 = json.loads((outs[1] / "tuckerize_manifest.json").read_text())
    m2 = json.loads((outs[2] / "tuckerize_manifest.json").read_text())
    assert m1["rank_plan"] == m2["rank_plan"]
    s1 = _factors_stats(outs[1])
    s2 = _factors_stats(outs[2])
    for k in s1:
        assert torch.linalg.norm(s1[k] - s2[k]) <= 1e-9 * torch.linalg.norm(s1[k]), k


def _factors_stats(folder: Path) -> dict:
    from safetensors.torch import load_file

    return {k: v.double() for k, v in load_file(str(folder / "calibration_stats.safetensors")).items()}


def test_rank_journals_merged_and_dropped(tmp_path):
    """previous(): the main journal plus every rank journal of the same fingerprint (a rank's
    newer entry wins); another fingerprint's rank journal is ignored; start() folds them into
    ``earlier`` and removes them; --overwrite's record names them."""
    from tuckerize.compress.output import RANK_JOURNAL, OutputFolder
    from tuckerize.format import JOURNAL_NAME
    from tuckerize.progress import ensure

    fp = {"ranks": 1}
    entry = {"file": "a", "bytes": 1, "sha256": "x"}
    (tmp_path / JOURNAL_NAME).write_text(json.dumps({"fingerprint": fp, "files": {"a": entry}, "earlier": {}}))
    (tmp_path / RANK_JOURNAL.format(0)).write_text(json.dumps(
        {"fingerprint": fp, "files": {"a": {**entry, "sha256": "y"}}, "earlier": {"b": entry}}))
    (tmp_path / RANK_JOURNAL.format(1)).write_text(json.dumps({"fingerprint": {"ranks": 2}, "files": {"c": entry}}))
    folder = OutputFolder(tmp_path, ensure(None))
    previous = folder.previous()
    assert previous["fingerprint"] == fp
    assert {**previous.get("earlier", {}), **previous["files"]} == {"a": {**entry, "sha256": "y"}, "b": entry}
    assert {RANK_JOURNAL.format(0), RANK_JOURNAL.format(1), "a", "b", "c"} <= folder.recorded()
    done = folder.start(fp, [])
    assert sorted(done) == ["a", "b"]
    assert not list(tmp_path.glob(".tuckerize-journal-rank-*"))
    assert json.loads((tmp_path / JOURNAL_NAME).read_text())["earlier"]["a"]["sha256"] == "y"


def test_allocated_three_processes_equal_one(tmp_path):
    """--ratio: the mode spectra are divided among the ranks and gathered; the plan and every
    byte equal one process's."""
    args = ["--model", str(DEMOS["mixtral"]), "--ratio", "0.5", "--save-config", str(tmp_path / "plan.yaml")]
    got = {}
    for nproc in (1, 3):
        out = tmp_path / f"out{nproc}"
        r = decompose(nproc, [*args, "--out", str(out)], tmp_path)
        assert r.returncode == 0, r.stderr[-3000:]
        got[nproc] = contents(out)
    assert "rank_plan.yaml" in got[1]
    assert got[1] == got[3]


def test_bytes_two_processes_equal_one(tmp_path):
    """--bytes under torchrun: the candidates of each rank's layers gathered, the same choice on
    every rank, every tensor (packed bases included) equal to one process's, from the same
    statistics."""
    args = ["--model", str(DEMOS["qwen3"]), "--samples", "16", "--seqlen", "32", "--bytes", "0.17"]
    one, two = tmp_path / "one", tmp_path / "two"
    r = decompose(1, [*args, "--calibration", "demo", "--out", str(one)], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    r = decompose(2, [*args, "--calibration", str(one), "--out", str(two)], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = _factors(one), _factors(two)
    assert sorted(a) == sorted(b) and any(n.endswith(".base.qcodes") for n in a)
    for n in a:
        assert a[n].dtype == b[n].dtype and a[n].shape == b[n].shape, n
        assert torch_close(a[n], b[n]), n
    m1 = json.loads((one / "tuckerize_manifest.json").read_text())
    m2 = json.loads((two / "tuckerize_manifest.json").read_text())
    assert m1["rank_plan"] == m2["rank_plan"] and m1["bytes"]["experts_stored"] == m2["bytes"]["experts_stored"]


def torch_close(x, y) -> bool:
    """Codes equal; float tensors within 1e-5 relative."""
    import torch

    if not x.is_floating_point():
        return bool(torch.equal(x, y))
    return float(torch.linalg.norm(x.double() - y.double())) <= 1e-5 * max(float(torch.linalg.norm(x.double())), 1e-30)

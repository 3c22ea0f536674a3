"""``tuckerize eval`` under real ``torchrun`` (gloo on CPU) from shard sets written by
``tuckerize shard --tp N``: the report equals the single-process one, and a shard set
launched with the wrong number of processes fails cleanly on every rank. The report states the
checkpoint's stored expert bytes and the shard set's (all ranks together, per rank), as
counted here from the rank files, and the summary line says both apart.

The tiny Qwen3-MoE has 4 query heads over 2 key/value heads, so tp=4 replicates the
key/value heads.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import dist_helpers
import tucker_refs as R
from tuckerize.evaluate import evaluate

TOL = 1e-5
EVAL_ARGS = ["--backend", "cpu", "--seqlen", "32", "--max-windows", "3", "--layer-tokens", "16", "--no-cache"]


def _torchrun() -> list[str]:
    exe = Path(sys.executable).with_name("torchrun")
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "torch.distributed.run"]


def _run_torchrun(nproc: int, args: list[str], tmp: Path, log_dir: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TUCKERIZE_CACHE": str(tmp / "cache")}
    env.pop("TUCKERIZE_DEBUG", None)
    logs = ["--log-dir", str(log_dir), "--redirects", "3"] if log_dir else []
    cmd = [*_torchrun(), "--nproc_per_node", str(nproc), "--rdzv-backend=c10d",
           f"--rdzv-endpoint=127.0.0.1:{dist_helpers.free_port()}", *logs, "-m", "tuckerize", "eval", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=180, cwd=tmp)


@pytest.fixture(scope="module")
def shard_sets(tiny_eval, tmp_path_factory):
    """``tuckerize shard --tp N`` of the tiny low-rank Tucker checkpoint, N = 2 and 4."""
    from typer.testing import CliRunner

    from tuckerize.cli import app

    root = tmp_path_factory.mktemp("eval_shards")
    out = {}
    for tp in (2, 4):
        out[tp] = root / f"tp{tp}"
        result = CliRunner().invoke(app, ["shard", str(tiny_eval["low"]), "--tp", str(tp), "--out", str(out[tp]),
                                          "--json"])
        assert result.exit_code == 0, result.stderr
        assert json.loads(result.stdout)["tp"] == tp
    return out


@pytest.fixture(scope="module")
def single_process_report(tiny_eval):
    return evaluate(str(tiny_eval["low"]), str(tiny_eval["src"]), text=str(tiny_eval["text"]), seqlen=32,
                    max_windows=3, layer_tokens=16, use_cache=False)


@pytest.mark.parametrize("tp", [2, 4])
def test_torchrun_report_equals_single_process(tp, shard_sets, single_process_report, tiny_eval, tmp_path):
    out = tmp_path / "report.json"
    proc = _run_torchrun(tp, ["--model", str(shard_sets[tp]), "--baseline", str(tiny_eval["src"]), "--text",
                              str(tiny_eval["text"]), *EVAL_ARGS, "--json", str(out)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got, ref = json.loads(out.read_text()), single_process_report
    assert got["settings"]["world_size"] == tp and got["settings"]["runtime"] == "native"
    assert ref["settings"]["world_size"] == 1
    assert got["text"] == ref["text"] and got["tokens_used"] == ref["tokens_used"]
    assert not got["baseline_result"]["cached"]
    pairs = {
        "baseline perplexity": (got["baseline_result"]["perplexity"], ref["baseline_result"]["perplexity"]),
        "Tucker perplexity": (got["tucker_result"]["perplexity"], ref["tucker_result"]["perplexity"]),
        "KL": (got["fidelity"]["kl_mean"], ref["fidelity"]["kl_mean"]),
        "top-1": (got["fidelity"]["top1_agreement"], ref["fidelity"]["top1_agreement"]),
    }
    pairs.update({f"layer {k} error": (got["fidelity"]["layer_relative_error"][k], v)
                  for k, v in ref["fidelity"]["layer_relative_error"].items()})
    bad = {k: (a, b) for k, (a, b) in pairs.items() if not abs(a - b) <= TOL * abs(b)}
    assert not bad, f"tp={tp} differs from one process: {bad}"
    assert ref["fidelity"]["kl_mean"] > 1e-2  # a real difference to reproduce
    # Only rank 0 writes the table.
    assert proc.stderr.count("original vs Tucker") + proc.stdout.count("original vs Tucker") == 1
    # Bytes: the checkpoint's as from one process; the shard set's counted from its rank files.
    per_rank = [R.expert_bytes_on_disk(d) for d in sorted(shard_sets[tp].glob("rank-*"))]
    assert len(per_rank) == tp and got["compression_bytes"] == ref["compression_bytes"]
    sb, layout = got["shard_bytes"], json.loads((shard_sets[tp] / "shard_manifest.json").read_text())["layout"]
    assert (sb["tp"], sb["layout"], sb["experts_stored_per_rank"], sb["experts_stored"]) == (tp, layout, per_rank,
                                                                                             sum(per_rank))
    assert sb["ratio_to_bf16_dense"] == pytest.approx(sum(per_rank) / ref["compression_bytes"]["experts_dense_bf16"])
    assert "shard_bytes" not in ref
    last = proc.stderr.rstrip().splitlines()[-1]
    assert last.startswith("summary: the Tucker checkpoint's routed experts take "), last
    m = re.search(rf"; the tp={tp} shard set: ([\d.]+) KiB on {tp} ranks together, (.+)$", last)
    assert m and float(m.group(1)) * 1024 == pytest.approx(sum(per_rank), abs=52), last
    ranks = re.findall(r"([\d.]+) KiB", m.group(2))
    assert [float(v) * 1024 for v in ranks] == pytest.approx(per_rank[:len(ranks)], abs=52)
    assert len(ranks) == (1 if len(set(per_rank)) == 1 else tp), last


def test_torchrun_wrong_number_of_processes(shard_sets, tiny_eval, tmp_path):
    """Every rank stops with the one-line error naming the tp to launch with. torchrun
    stops the other ranks once one has failed, so each rank's exit code is checked with
    the same launch done by hand (torchrun's environment, one process per rank)."""
    args = ["--model", str(shard_sets[4]), "--baseline", str(tiny_eval["src"]), "--text", str(tiny_eval["text"]),
            *EVAL_ARGS]

    def check(stderr: str) -> None:
        lines = [l for l in stderr.splitlines() if l.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: "), lines
        assert "tp=4" in lines[0] and "2 processes" in lines[0] and "--nproc_per_node 4" in lines[0]

    logs = tmp_path / "logs"
    proc = _run_torchrun(2, args, tmp_path, log_dir=logs)
    assert proc.returncode != 0
    stderr_logs = sorted(logs.rglob("stderr.log"))
    assert len(stderr_logs) == 2, stderr_logs
    for path in stderr_logs:
        check(path.read_text())
    assert "exitcode  : 1 " in proc.stderr, proc.stderr[-2000:]  # the first rank to finish exited 1

    port = dist_helpers.free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TUCKERIZE_CACHE": str(tmp_path / "cache"),
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}
    env.pop("TUCKERIZE_DEBUG", None)
    procs = [subprocess.Popen([sys.executable, "-m", "tuckerize", "eval", *args], cwd=tmp_path,
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in range(2)]
    try:
        results = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:  # only the processes started above
            if p.poll() is None:
                p.kill()
                p.wait(5)
    for r, (p, (out, err)) in enumerate(zip(procs, results)):
        assert p.returncode == 1, (r, p.returncode, err)
        check(err)
        assert out == ""

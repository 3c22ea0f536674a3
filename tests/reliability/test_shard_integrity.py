"""Shard sets: the source's identity recorded and checked, a damaged shard manifest refused
with one line, and under real torchrun (gloo, 2 processes) one rank's damaged shard file
stops every rank with the one-line message (no gloo traceback)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import dist_helpers
from reliab_helpers import *  # noqa: F401,F403
from reliab_helpers import flip_byte, one_line, run_cli, snapshot
from tuckerize.errors import IntegrityError, ShardError

EVAL = ["--seqlen", "32", "--max-windows", "2", "--layer-tokens", "8", "--no-cache"]


@pytest.fixture(scope="module")
def shards(tiny, tmp_path_factory) -> Path:
    from tuckerize.shard import shard_checkpoint

    out = tmp_path_factory.mktemp("reliab_shards") / "tp2"
    shard_checkpoint(tiny["tucker"], 2, out=out)
    return out


def test_shard_set_records_source_identity(tiny, shards):
    from tuckerize.integrity import manifest_sha256

    source = json.loads((shards / "shard_manifest.json").read_text())["source"]
    assert source["path"] == str(tiny["tucker"].resolve())
    assert source["manifest_sha256"] == manifest_sha256(tiny["tucker"])


def test_source_replaced_since_sharding_is_refused(tiny, shards, work_copy, tmp_path):
    """A shard set whose source folder now holds another decomposition: eval's default
    baseline and compression figures would come from the wrong manifest, so it is refused."""
    from tuckerize.shardset import tucker_manifest

    tucker = work_copy(tiny["tucker"], "tucker")
    shard = work_copy(shards, "tp2")
    m = json.loads((shard / "shard_manifest.json").read_text())
    m["source"]["path"] = str(tucker)
    (shard / "shard_manifest.json").write_text(json.dumps(m))
    assert tucker_manifest(shard)["source"]["path"] == str(tiny["src"])  # unchanged source: fine
    manifest = json.loads((tucker / "tuckerize_manifest.json").read_text())
    manifest["settings"]["hooi_iters"] = 99  # as if decomposed again with other settings
    (tucker / "tuckerize_manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(IntegrityError, match=rf"{tucker}.*another decomposition.*tuckerize shard"):
        tucker_manifest(shard)


@pytest.mark.parametrize("damage", ["garbage", "list", "no-ranks"])
def test_damaged_shard_manifest_one_line(damage, tiny, shards, work_copy, tmp_path):
    shard = work_copy(shards, "tp2")
    path = shard / "shard_manifest.json"
    m = json.loads(path.read_text())
    if damage == "garbage":
        path.write_bytes(path.read_bytes()[:100])
    elif damage == "list":
        path.write_text(json.dumps([m]))
    else:
        del m["ranks"]
        path.write_text(json.dumps(m))
    before = snapshot(shard)
    from tuckerize.shardset import ShardSet

    with pytest.raises(IntegrityError, match=r"shard_manifest.json is damaged.*tuckerize shard"):
        ShardSet.open(shard)
    if damage == "garbage":  # and the same through the CLI, as a real process
        proc = run_cli("eval", "--model", shard, "--baseline", tiny["src"], "--text", tiny["text"], *EVAL,
                       cwd=tmp_path)
        assert proc.returncode == 1 and proc.stdout == ""
        one_line(proc.stderr, str(path), "damaged", "tuckerize shard")
    assert snapshot(shard) == before


def _torchrun() -> list[str]:
    exe = Path(sys.executable).with_name("torchrun")
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "torch.distributed.run"]


def test_torchrun_one_rank_corrupt_every_rank_one_line(tiny, shards, work_copy, tmp_path):
    shard = work_copy(shards, "tp2")
    victim = sorted((shard / "rank-00001-of-00002").glob("model-*.safetensors"))[-1]
    flip_byte(victim)
    logs = tmp_path / "logs"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TUCKERIZE_CACHE": str(tmp_path / "cache")}
    env.pop("TUCKERIZE_DEBUG", None)
    cmd = [*_torchrun(), "--nproc_per_node", "2", "--rdzv-backend=c10d",
           f"--rdzv-endpoint=127.0.0.1:{dist_helpers.free_port()}", "--log-dir", str(logs), "--redirects", "3",
           "-m", "tuckerize", "eval", "--model", str(shard), "--baseline", str(tiny["src"]),
           "--text", str(tiny["text"]), *EVAL]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240, cwd=tmp_path)
    assert proc.returncode != 0
    stderr_logs = sorted(logs.rglob("stderr.log"))
    assert len(stderr_logs) == 2, (stderr_logs, proc.stderr[-2000:])
    lines = {}
    for path in stderr_logs:
        text = path.read_text()
        assert "gloo" not in text.lower(), text
        lines[path.parent.name] = one_line(text, str(victim), "corrupted", "tuckerize shard")
    # Rank 0's files were fine: it names the rank whose file is damaged.
    assert any(line.startswith("error: rank 1: ") for line in lines.values()), lines
    assert "exitcode  : 1 " in proc.stderr, proc.stderr[-2000:]


def test_verify_shard_rank_caches(shards, work_copy, monkeypatch):
    import tuckerize.integrity as integrity
    from tuckerize.shardset import ShardSet

    shard = work_copy(shards, "tp2")
    hashed = []
    real = integrity.sha256_file
    monkeypatch.setattr(integrity, "sha256_file", lambda p: hashed.append(p) or real(p))
    s = ShardSet.open(shard)
    s.rank_folder(0, 2)
    n = len(hashed)
    assert n == len(s.manifest["ranks"][0]["files"])
    s.rank_folder(0, 2)
    assert len(hashed) == n
    flip_byte(sorted((shard / "rank-00000-of-00002").glob("model-*.safetensors"))[0])
    with pytest.raises(ShardError, match="corrupted"):
        s.rank_folder(0, 2)

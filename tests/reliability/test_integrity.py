"""Verification of an unsharded Tucker checkpoint against its manifest's sha256s
(:func:`tuckerize.integrity.verify_checkpoint`), on its own and through ``eval`` and ``shard``:
a flipped bit in a factor file is refused with one line, the shard output is not created, and
nothing else on disk changes; the hash is computed once per file and cached."""

from __future__ import annotations

import json
import os

import pytest

from reliab_helpers import *  # noqa: F401,F403
from reliab_helpers import flip_byte, one_line, run_cli, snapshot
from tuckerize.errors import InputError, IntegrityError


def _factor_file(folder):
    """The unit file that holds layer 0's expert factors."""
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    return folder / index["model.layers.0.mlp.experts.gate.core"]


def test_verify_checkpoint_hashes_once_and_sees_any_change(tiny, work_copy, monkeypatch):
    import tuckerize.integrity as integrity

    folder = work_copy(tiny["tucker"], "tucker")
    manifest = json.loads((folder / "tuckerize_manifest.json").read_text())
    hashed = []
    real = integrity.sha256_file
    monkeypatch.setattr(integrity, "sha256_file", lambda p: hashed.append(p.name) or real(p))

    assert integrity.verify_checkpoint(folder) == manifest
    recorded = {*manifest["files"], *manifest.get("side_files", {})}  # layer files and side files
    assert manifest.get("side_files") and sorted(hashed) == sorted(recorded)  # every file once
    cache = json.loads((folder / integrity.VERIFY_CACHE_NAME).read_text())
    assert set(cache["files"]) == recorded
    hashed.clear()
    integrity.verify_checkpoint(folder)
    assert hashed == []  # cached: no file read again

    victim = _factor_file(folder)
    st = victim.stat()
    flip_byte(victim)
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))  # even with the old mtime (ctime changes)
    with pytest.raises(IntegrityError, match=rf"{victim.name} is corrupted.*sha256.*tuckerize decompose"):
        integrity.verify_checkpoint(folder)
    assert hashed == [victim.name]
    integrity.verify_checkpoint(folder, verify=False)  # sizes only: passes
    victim.write_bytes(victim.read_bytes()[:-8])
    with pytest.raises(IntegrityError, match=rf"{victim.name} is corrupted: \d+ bytes"):
        integrity.verify_checkpoint(folder, verify=False)
    victim.unlink()
    with pytest.raises(IntegrityError, match=rf"{victim.name} is missing"):
        integrity.verify_checkpoint(folder, verify=False)


def test_verify_checkpoint_damaged_cache_and_manifest(tiny, work_copy):
    from tuckerize.integrity import VERIFY_CACHE_NAME, verify_checkpoint

    folder = work_copy(tiny["tucker"], "tucker")
    (folder / VERIFY_CACHE_NAME).write_text("{not json")
    verify_checkpoint(folder)  # a damaged cache is ignored and rewritten
    assert json.loads((folder / VERIFY_CACHE_NAME).read_text())["version"] == 1
    # A cache entry that claims another hash for this very stat is not trusted.
    cache = json.loads((folder / VERIFY_CACHE_NAME).read_text())
    victim = _factor_file(folder)
    flip_byte(victim)
    for entry in cache["files"].values():
        entry["stat"] = None
    (folder / VERIFY_CACHE_NAME).write_text(json.dumps(cache))
    with pytest.raises(IntegrityError, match=victim.name):
        verify_checkpoint(folder)

    (folder / "tuckerize_manifest.json").write_text('{"files": ')
    with pytest.raises(IntegrityError, match="tuckerize_manifest.json is damaged"):
        verify_checkpoint(folder)
    (folder / "tuckerize_manifest.json").unlink()
    with pytest.raises(InputError, match="not a finished Tucker checkpoint"):
        verify_checkpoint(folder)


def test_read_only_folder_is_verified_without_cache(tiny, work_copy):
    from tuckerize.integrity import VERIFY_CACHE_NAME, verify_checkpoint

    folder = work_copy(tiny["tucker"], "tucker")
    os.chmod(folder, 0o555)
    try:
        if os.access(folder, os.W_OK):
            pytest.skip("running as a user that can write anyway (root)")
        verify_checkpoint(folder)
        assert not (folder / VERIFY_CACHE_NAME).exists()
    finally:
        os.chmod(folder, 0o755)


def test_flipped_bit_eval_and_shard_refuse(tiny, work_copy, tmp_path):
    """The issue's case: one flipped bit in a factor file. eval and shard exit 1 with one
    line naming the file and the fix; no shard folder appears; nothing else changed."""
    folder = work_copy(tiny["tucker"], "tucker")
    victim = _factor_file(folder)
    flip_byte(victim)
    before = snapshot(tmp_path)

    proc = run_cli("eval", "--model", folder, "--baseline", tiny["src"], "--text", tiny["text"], "--seqlen", 32,
                   "--max-windows", 1, cwd=tmp_path)
    assert proc.returncode == 1 and proc.stdout == ""
    one_line(proc.stderr, str(victim), "corrupted", "sha256", "tuckerize decompose")

    out = tmp_path / "shards"
    proc = run_cli("shard", folder, "--tp", 2, "--out", out, cwd=tmp_path)
    assert proc.returncode == 1 and proc.stdout == ""
    one_line(proc.stderr, str(victim), "corrupted", "tuckerize decompose")
    assert not out.exists() and not list(tmp_path.glob(".shards*"))
    after = snapshot(tmp_path)
    after.pop(str(tmp_path / "tuckerize-cache"), None)  # eval's (empty) cache folder may appear
    assert after == before


def test_shard_no_verify_skips_the_hash(tiny, work_copy, cli_runner, tmp_path):
    folder = work_copy(tiny["tucker"], "tucker")
    flip_byte(_factor_file(folder))
    result = cli_runner("shard", folder, "--tp", 2, "--out", tmp_path / "s", "--no-verify", "--json")
    assert result.exit_code == 0, result.stderr
    assert (tmp_path / "s" / "shard_manifest.json").is_file()


@pytest.fixture
def cli_runner():
    from typer.testing import CliRunner

    from tuckerize.cli import app

    return lambda *args: CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.mark.parametrize("command", ["shard", "eval"])
def test_damaged_tucker_manifest_one_line(tiny, work_copy, cli_runner, tmp_path, command):
    folder = work_copy(tiny["tucker"], "tucker")
    path = folder / "tuckerize_manifest.json"
    path.write_bytes(path.read_bytes()[:200])
    before = snapshot(tmp_path)
    args = (["shard", folder, "--tp", 2, "--out", tmp_path / "s"] if command == "shard" else
            ["eval", "--model", folder, "--baseline", tiny["src"], "--text", tiny["text"], "--seqlen", 32])
    result = cli_runner(*args)
    assert result.exit_code == 1 and result.stdout == ""
    one_line(result.stderr, str(path), "damaged", "tuckerize decompose")
    assert snapshot(tmp_path) == before

"""``tuckerize decompose`` with damaged or unusual output folders (issue 9, decompose side).

Each error case builds the situation, runs the CLI, and checks the error contract (exit
code 1, one line on stderr naming the file and the fix) and that nothing else on disk
changed. Recovery cases (stale lock, files of a killed run, a corrupt journal) check that
the run completes with the same bytes as an undisturbed one.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from reliab_helpers import strip_timings
from cli_helpers import assert_cli_error
from typer.testing import CliRunner

from tuckerize.cli import app

RANKS = "3,12,6"
LOCK = ".tuckerize.lock"
JOURNAL = ".tuckerize-journal.json"
MANIFEST = "tuckerize_manifest.json"


def cli(*args: str):
    return CliRunner().invoke(app, ["decompose", *args])


def decompose(src: Path, out: Path, *extra: str):
    return cli("--model", str(src), "--ranks", RANKS, "--out", str(out), *extra)


def tree(folder: Path) -> dict[str, str]:
    """Every path under ``folder`` (folders too) -> sha256 of its bytes ("dir" for folders)."""
    if not folder.exists():
        return {}
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = str(p.relative_to(folder))
        out[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out




def contents(folder: Path) -> dict[str, str]:
    """Like :func:`tree`, with JSON files compared without their timings."""
    out = tree(folder)
    for name in out:
        if name.endswith(".json"):
            out[name] = json.dumps(strip_timings(json.loads((folder / name).read_text())), sort_keys=True)
    return out


@pytest.fixture(scope="module")
def reference(qwen3_ckpt, tmp_path_factory) -> Path:
    """An undisturbed run of the command every test uses."""
    out = tmp_path_factory.mktemp("ref") / "out"
    r = decompose(qwen3_ckpt, out)
    assert r.exit_code == 0, r.output
    return out


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def interrupted(src: Path, out: Path, after_layer: int) -> None:
    """A run stopped (as by Ctrl-C) once ``after_layer`` is written: journal, no manifest."""
    from tuckerize.compress import decompose_checkpoint

    class Stop:
        def start(self, task, total): pass
        def finish(self, task): pass

        def advance(self, task, n=1, **info):
            if task == "decompose" and info.get("layer") == after_layer + 1 and info.get("projection") == "gate":
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        decompose_checkpoint(str(src), out, ranks=RANKS, progress=Stop())
    assert (out / JOURNAL).is_file() and not (out / MANIFEST).exists()


# ---------------------------------------------------------------- the lock


def test_second_run_on_a_locked_folder_is_refused(qwen3_ckpt, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / LOCK).write_text(json.dumps({"pid": holder.pid, "host": os.uname().nodename}))
        before = tree(tmp_path)
        line = assert_cli_error(decompose(qwen3_ckpt, out), str(out), f"PID {holder.pid}", "wait for it")
        assert tree(tmp_path) == before, line
    finally:
        holder.kill()
        holder.wait()


def test_stale_lock_of_a_dead_process_is_taken_over(qwen3_ckpt, tmp_path, reference):
    out = tmp_path / "out"
    interrupted(qwen3_ckpt, out, after_layer=0)
    (out / LOCK).write_text(json.dumps({"pid": dead_pid(), "host": os.uname().nodename}))
    r = decompose(qwen3_ckpt, out)
    assert r.exit_code == 0, r.output
    assert "resuming in" in r.stderr and "continuing from layer 1" in r.stderr
    assert contents(out) == {**contents(reference), MANIFEST: contents(out)[MANIFEST]}
    assert not (out / LOCK).exists()


def test_lock_is_released_after_an_error(qwen3_ckpt, tmp_path):
    out = tmp_path / "out"
    interrupted(qwen3_ckpt, out, after_layer=0)
    assert_cli_error(cli("--model", str(qwen3_ckpt), "--ranks", "2,8,4", "--out", str(out)), "other settings")
    assert not (out / LOCK).exists()


# ---------------------------------------------------------------- --overwrite


@pytest.mark.parametrize("foreign", ["notes.txt", "subfolder/kept.txt"])
def test_overwrite_refuses_a_folder_with_foreign_files(qwen3_ckpt, tmp_path, reference, foreign):
    out = tmp_path / "out"
    assert decompose(qwen3_ckpt, out).exit_code == 0
    (out / foreign).parent.mkdir(exist_ok=True)
    (out / foreign).write_text("the user's own")
    before = tree(tmp_path)
    line = assert_cli_error(decompose(qwen3_ckpt, out, "--overwrite"), str(out / foreign.split("/")[0]),
                            "was not written by tuckerize", "move it away")
    assert tree(tmp_path) == before, line


def test_overwrite_deletes_only_recorded_files(qwen3_ckpt, tmp_path):
    out = tmp_path / "out"
    assert decompose(qwen3_ckpt, out).exit_code == 0
    old = set(tree(out))
    r = cli("--model", str(qwen3_ckpt), "--ranks", "2,8,4", "--out", str(out), "--overwrite", "--json")
    assert r.exit_code == 0, r.output
    manifest = json.loads(r.stdout)
    assert {t["ranks"][0] for t in manifest["tensors"]} == {2}
    assert set(tree(out)) == old  # same names, rewritten
    assert set(manifest["written"]) | set(manifest["files"]) | {MANIFEST} == set(tree(out))


def test_side_files_are_covered_by_the_manifest(reference):
    manifest = json.loads((reference / MANIFEST).read_text())
    assert "tokenizer.json" in manifest["side_files"] and "config.json" in manifest["side_files"]
    for name, entry in manifest["side_files"].items():
        data = (reference / name).read_bytes()
        assert entry == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}, name


# ---------------------------------------------------------------- leftovers of killed runs


def test_temporary_files_of_a_killed_run_are_removed(qwen3_ckpt, tmp_path, reference):
    out = tmp_path / "out"
    interrupted(qwen3_ckpt, out, after_layer=0)
    pid = dead_pid()
    for name in (".model-00002-of-00003.safetensors", ".tuckerize-journal.json", ".config.json"):
        (out / f"{name}.tmp-{pid}").write_bytes(b"half a file")
    r = decompose(qwen3_ckpt, out)
    assert r.exit_code == 0, r.output
    assert not [p.name for p in out.iterdir() if ".tmp-" in p.name]
    assert contents(out).keys() == contents(reference).keys()


def test_corrupt_journal_is_reported_and_redone(qwen3_ckpt, tmp_path, reference):
    out = tmp_path / "out"
    interrupted(qwen3_ckpt, out, after_layer=0)
    (out / JOURNAL).write_text('{"fingerprint": {"format_version": 1, "sour')  # cut short
    r = decompose(qwen3_ckpt, out)
    assert r.exit_code == 0, r.output
    assert f"{JOURNAL} is unreadable; redoing" in r.stderr
    assert contents(out) == {**contents(reference), MANIFEST: contents(out)[MANIFEST]}
    ref_m, got_m = (json.loads((f / MANIFEST).read_text()) for f in (reference, out))
    ref_m.pop("out"), got_m.pop("out")
    assert strip_timings(got_m) == strip_timings(ref_m)


def test_resume_says_from_where(qwen3_ckpt, tmp_path):
    out = tmp_path / "out"
    interrupted(qwen3_ckpt, out, after_layer=0)
    r = decompose(qwen3_ckpt, out)
    assert r.exit_code == 0, r.output
    assert f"resuming in {out}: 2 of 3 files kept from the earlier run; continuing from layer 1" in r.stderr


# ---------------------------------------------------------------- one-line write errors


def test_out_below_a_file(qwen3_ckpt, tmp_path):
    (tmp_path / "afile").write_text("x")
    before = tree(tmp_path)
    assert_cli_error(decompose(qwen3_ckpt, tmp_path / "afile" / "out"), str(tmp_path / "afile"),
                     "is a file, not a folder", "--out")
    assert tree(tmp_path) == before


def test_read_only_output_folder(qwen3_ckpt, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    if os.geteuid() != 0:
        out.chmod(0o555)
    else:  # root writes through permission bits: fail the first write in the folder instead
        import tuckerize.compress.output as output

        real_open = os.open

        def read_only(path, *a, **k):
            if Path(path).parent == out:
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
            return real_open(path, *a, **k)

        monkeypatch.setattr(output.os, "open", read_only)
    try:
        before = tree(tmp_path)
        assert_cli_error(decompose(qwen3_ckpt, out), str(out), "choose")
        assert tree(tmp_path) == before
    finally:
        out.chmod(0o755)


def test_unwritable_system_path(qwen3_ckpt):
    """A real operating-system refusal, whatever the user: below /sys or /proc."""
    target = None
    for base in ("/sys", "/proc"):
        try:
            os.mkdir(f"{base}/tuckerize-probe")
        except OSError as exc:
            if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
                target = Path(base) / "tuckerize-probe"
                break
        else:
            os.rmdir(f"{base}/tuckerize-probe")
    if target is None:
        pytest.skip("no read-only system folder here")
    assert_cli_error(decompose(qwen3_ckpt, target), str(target), "--out")


def test_disk_full(qwen3_ckpt, tmp_path, monkeypatch):
    """ENOSPC while a layer file is written (simulated: no small tmpfs without privileges)."""
    import tuckerize.checkpoint as checkpoint

    calls = {"n": 0}
    real_fsync = os.fsync

    def full(fd):
        calls["n"] += 1
        if calls["n"] == 4:  # journal, unit 0, journal, then layer 0's file
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)

    monkeypatch.setattr(checkpoint.os, "fsync", full)
    out = tmp_path / "out"
    line = assert_cli_error(decompose(qwen3_ckpt, out), "no space left", "free some space")
    assert str(out / "model-00001-of-00003.safetensors") in line
    assert not [p.name for p in out.iterdir() if ".tmp-" in p.name or p.name == LOCK]
    assert not (out / MANIFEST).exists()
    monkeypatch.setattr(checkpoint.os, "fsync", real_fsync)
    r = decompose(qwen3_ckpt, out)  # space freed: the run resumes
    assert r.exit_code == 0 and "continuing from layer 0" in r.stderr, r.output


def test_tiny_ratio_leaves_no_folder(qwen3_ckpt, tmp_path):
    out = tmp_path / "out"
    assert_cli_error(cli("--model", str(qwen3_ckpt), "--ratio", "0.0001", "--out", str(out)),
                     "below the smallest ranks", "raise --ratio")
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_cuda_error_names_device(qwen3_ckpt, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    assert_cli_error(decompose(qwen3_ckpt, tmp_path / "out", "--device", "cuda"), "--device cpu")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- the shared writer, from shard


def test_shard_gets_the_same_one_line_write_errors(reference, tmp_path, monkeypatch):
    """Disk full and an unwritable --out in `tuckerize shard` (the writer is shared)."""
    import tuckerize.checkpoint as checkpoint

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoint.os, "fsync", full)
    r = CliRunner().invoke(app, ["shard", str(reference), "--tp", "2", "--out", str(tmp_path / "tp2")])
    assert_cli_error(r, "no space left", "free some space", str(tmp_path))
    monkeypatch.undo()
    (tmp_path / "afile").write_text("x")
    r = CliRunner().invoke(app, ["shard", str(reference), "--tp", "2", "--out", str(tmp_path / "afile" / "tp2")])
    assert_cli_error(r, str(tmp_path / "afile"), "not a folder")

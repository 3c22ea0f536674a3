"""Helpers for the reliability tests of verification on load, eval and shard: a tiny model with
its Tucker checkpoint, damaging files in place, the CLI run as a real process (whole stderr),
and snapshots that show nothing else on disk changed.

Fixtures are imported by the test modules (``from reliab_helpers import *``) rather than put
in a conftest, so that this folder can hold other engineers' reliability tests too.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import model_refs as M
from cli_helpers import TIMINGS, strip_timings  # noqa: F401  (re-exported)
import tucker_refs as R

__all__ = ["tiny", "work_copy", "run_cli", "one_line", "snapshot", "flip_byte", "in_process", "cache", "cli",
           "strip_timings", "TIMINGS"]


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """Tiny Qwen3-MoE (vocab 64, 128 positions), its Tucker checkpoint (ranks of
    ``tucker_refs.PLAN_YAML``), another model of the same shapes (other weights), one with
    another vocabulary, and a text. Shared: copy before damaging (:func:`work_copy`)."""
    root = tmp_path_factory.mktemp("reliab")
    src = M.build_random("qwen3_moe", root / "qwen3", seed=11)
    text = root / "text.txt"
    text.write_text(M.text_for_tiny(2000))
    return {"src": src, "tucker": R.decompose_tiny(src, root / "qwen3-tucker"), "text": text,
            "other": M.build_random("qwen3_moe", root / "other", seed=12),
            "vocab80": M.build_random("qwen3_moe", root / "vocab80", seed=11, vocab_size=80)}


@pytest.fixture
def work_copy(tmp_path):
    """``work_copy(folder, name)``: a copy of a shared folder under this test's tmp_path."""
    def copy(folder: Path, name: str) -> Path:
        return Path(shutil.copytree(folder, tmp_path / name))
    return copy


def run_cli(*args, cwd: Path, env: dict | None = None, timeout: int = 180) -> subprocess.CompletedProcess:
    """``python -m tuckerize ARGS`` as a real process, offline, with a private cache."""
    full = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
            "TUCKERIZE_CACHE": str(Path(cwd) / "tuckerize-cache"), **(env or {})}
    full.pop("TUCKERIZE_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "tuckerize", *map(str, args)], cwd=cwd, env=full,
                          capture_output=True, text=True, timeout=timeout)


def one_line(stderr: str, *fragments: str) -> str:
    """stderr is exactly one line ``error: ...`` (no traceback) holding every fragment."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr, stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def in_process(cli_result, *fragments: str) -> str:
    """The same contract for a typer CliRunner result: exit 1, nothing on stdout."""
    assert cli_result.exit_code == 1, (cli_result.exit_code, cli_result.stderr)
    assert cli_result.stdout == ""
    return one_line(cli_result.stderr, *fragments)


def snapshot(*folders: Path) -> dict[str, tuple[int, int, str]]:
    """Every file under ``folders``: (size, mtime_ns, sha256), to show nothing changed."""
    out = {}
    for folder in folders:
        for p in sorted(Path(folder).rglob("*")):
            if p.is_file():
                st = p.stat()
                out[str(p)] = (st.st_size, st.st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            elif p.is_dir():
                out[str(p)] = (0, 0, "dir")
    return out


def flip_byte(path: Path, from_end: int = 60) -> None:
    """Flip one byte inside the tensor data (same size, same header)."""
    data = bytearray(path.read_bytes())
    data[len(data) - from_end] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty baseline cache for this test (``TUCKERIZE_CACHE``, read by tuckerize.evaluate.cache when used)."""
    root = tmp_path / "tuckerize-cache"
    monkeypatch.setenv("TUCKERIZE_CACHE", str(root))
    return root / "baselines"


@pytest.fixture
def cli(cache):
    """``cli(*args)``: the CLI in-process (typer's runner), with the test's own baseline cache."""
    from typer.testing import CliRunner

    from tuckerize.cli import app

    return lambda *args: CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


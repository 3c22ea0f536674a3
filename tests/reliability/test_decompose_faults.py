"""Fault injection: ``tuckerize decompose`` killed with SIGKILL at random points, then rerun.

The resumed output must be byte-identical to an uninterrupted run (the manifest up to its
timings and its ``out`` path) with no temporary file or lock left behind. Kill points are
drawn per seed among the run's file writes (before one starts, half-way through one, right
after one is renamed into place), plus kills after a random delay and a run killed twice.
Each case starts two or three processes (torch imports dominate): seeds 2-3 and the
delay-based kills are marked slow.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cli_helpers import output_contents

RANKS = "3,12,6"

#: Runs the CLI; with KILL_AT=k the process SIGKILLs itself at its k-th file write
#: (KILL_MODE: before the write, during it with half the bytes in the temporary file,
#: or after the rename).
WRAPPER = r"""
import os, signal, sys
import tuckerize.checkpoint as c
k, mode, n = int(os.environ.get("KILL_AT", "0")), os.environ.get("KILL_MODE", ""), [0]
real = c.write_bytes
def write_bytes(path, data):
    n[0] += 1
    if n[0] == k and mode == "before":
        os.kill(os.getpid(), signal.SIGKILL)
    if n[0] == k and mode == "during":
        with open(c.tmp_name(path), "wb") as f:
            f.write(data[: len(data) // 2])
            f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    real(path, data)
    if n[0] == k and mode == "after":
        os.kill(os.getpid(), signal.SIGKILL)
c.write_bytes = write_bytes
from tuckerize.cli import app
app(prog_name="tuckerize")
"""


def command(src: Path, out: Path) -> list[str]:
    return [sys.executable, "-c", WRAPPER, "decompose", "--model", str(src), "--ranks", RANKS, "--out", str(out),
            "--json"]




def contents(folder: Path) -> dict[str, str]:
    return output_contents(folder)


def run(src: Path, out: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(command(src, out), env={**os.environ, **env}, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def reference(qwen3_ckpt, tmp_path_factory) -> tuple[Path, dict[str, str], int, float]:
    """(folder, contents, number of file writes, seconds) of an uninterrupted run."""
    out = tmp_path_factory.mktemp("ref") / "out"
    t0 = time.time()
    r = run(qwen3_ckpt, out)
    seconds = time.time() - t0
    assert r.returncode == 0, r.stderr
    # journal at the start, then per unit its file and the journal, then config, index, manifest
    units = len([p for p in out.iterdir() if p.name.startswith("model-") and p.name.endswith(".safetensors")])
    return out, contents(out), 1 + 2 * units + 3, seconds


def finish_and_check(src: Path, out: Path, expected: dict[str, str]) -> None:
    r = run(src, out)
    assert r.returncode == 0, r.stderr
    assert contents(out) == expected
    assert not [p.name for p in out.iterdir() if ".tmp-" in p.name or p.name == ".tuckerize.lock"]


@pytest.mark.parametrize("seed", [0, 1, pytest.param(2, marks=pytest.mark.slow), pytest.param(3, marks=pytest.mark.slow)])
def test_killed_at_a_file_write_then_resumed(qwen3_ckpt, tmp_path, reference, seed):
    _, expected, writes, _ = reference
    rng = random.Random(seed)
    # seed 0 always lands half-way through a layer file (write 2: unit 0's file)
    at, mode = (2, "during") if seed == 0 else (rng.randint(1, writes), rng.choice(["before", "during", "after"]))
    out = tmp_path / "out"
    r = run(qwen3_ckpt, out, KILL_AT=str(at), KILL_MODE=mode)
    assert r.returncode == -signal.SIGKILL, (at, mode, r.stderr)
    if mode == "during":
        assert [p.name for p in out.iterdir() if ".tmp-" in p.name], "the kill should leave a temporary file"
    finish_and_check(qwen3_ckpt, out, expected)


def test_killed_twice_then_resumed(qwen3_ckpt, tmp_path, reference):
    _, expected, writes, _ = reference
    out = tmp_path / "out"
    for at in (4, 3):  # layer 0's file on the first run, then mid-way through the resumed one
        r = run(qwen3_ckpt, out, KILL_AT=str(at), KILL_MODE="during")
        assert r.returncode == -signal.SIGKILL, r.stderr
    finish_and_check(qwen3_ckpt, out, expected)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_killed_after_a_random_delay_then_resumed(qwen3_ckpt, tmp_path, reference, seed):
    _, expected, _, seconds = reference
    out = tmp_path / "out"
    p = subprocess.Popen(command(qwen3_ckpt, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(random.Random(seed).uniform(0.5, 1.0) * seconds)
    p.send_signal(signal.SIGKILL)
    p.wait()
    finish_and_check(qwen3_ckpt, out, expected)

"""decompose CLI errors of calibrated runs: one line, exit 1."""

from __future__ import annotations

import subprocess
import sys

import pytest
from calibration_common import cli
from cli_helpers import assert_cli_error

from tuckerize.decompose.whiten import whitening


@pytest.mark.parametrize(
    "args, fragment",
    [
        (("--ratio", "0"), "outside (0, 1]"),
        (("--ratio", "1.5"), "outside (0, 1]"),
        (("--params", "0"), "--params 0"),
        (("--ratio", "0.5", "--ranks", "16,64,32"), "exactly one"),
        (("--ratio", "0.5", "--calibration", "/no/such/text.txt"), "does not exist"),
        (("--ranks", "16,64,32", "--config", "METHOD sequential: true"), "method.sequential needs --calibration"),
        (("--ranks", "16,64,32", "--config", "METHOD refit: true"), "method.refit needs --calibration"),
        (("--ranks", "16,64,32", "--config", "METHOD refit: yes please"), "method.refit 'yes please' is not true"),
        (("--ranks", "16,64,32", "--calibration", "demo", "--config", "METHOD damp: 0"), "method.damp 0"),
        (("--ratio", "0.5", "--config", "METHOD expert_rank: some"), "method.expert_rank 'some'"),
        (("--ranks", "16,64,32", "--calibration", "/no/such/calibration_stats.safetensors"), "do not exist"),
        (("--ranks", "16,64,32", "--factor-dtype", "int8,core=fp4"), "'fp4' is not one of"),
        (("--ranks", "16,64,32", "--calibration", "demo", "--config", "METHOD whitening: both"), "method.whitening 'both'"),
        (("--ranks", "16,64,32", "--calibration", "demo", "--config", "METHOD {whitening: pooled, expert_hidden: true}"),
         "expert_hidden needs"),
        (("--ranks", "16,64,32", "--calibration", "demo", "--config", "METHOD als_iters: -1"), "method.als_iters -1"),
        (("--ranks", "16,64,32", "--calibration", "demo", "--samples", "100000", "--seqlen", "512"), "fewer than"),
    ],
)
def test_cli_errors_are_one_line(tmp_path, args, fragment):
    """(``METHOD x: y``: a --config file whose method: section is ``x: y``.)"""
    args = list(args)
    for i, a in enumerate(args):
        if a.startswith("METHOD "):
            body = a.removeprefix("METHOD ")
            (tmp_path / "m.yaml").write_text(f"method: {body}\n" if body.startswith("{") else f"method:\n  {body}\n")
            args[i] = str(tmp_path / "m.yaml")
    assert_cli_error(cli(*args, "--out", str(tmp_path / "o")), fragment)


def test_cli_error_real_process(tmp_path):
    r = subprocess.run([sys.executable, "-m", "tuckerize", "decompose", "--ratio", "2", "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "--ratio 2" in lines[0], r.stderr

"""Baselines made by published quantisers in their own virtual environment (they pin their
own torch / transformers): GPTQ and AWQ by llmcompressor (bench/baselines/gptq.py, awq.py) and
HQQ by the ``hqq`` package (bench/baselines/halfquadratic.py). Each script writes a dense
checkpoint of dequantised experts, scored here like every other row; bytes as
:mod:`comparison.quantisers` counts each stored form.

The environment: ``python3 -m venv /work/venvs/compare && /work/venvs/compare/bin/pip install
torch==2.13.0 llmcompressor hqq`` (``--baseline-python`` names another).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

from comparison.protocol import BASELINES, REPO, SEQLEN
from comparison.quantisers import quantised_bytes

DEFAULT_PYTHON = "/work/venvs/compare/bin/python"
SCRIPTS = {"gptq": "gptq.py", "awq": "awq.py", "hqq": "halfquadratic.py"}
NAMES = {"gptq": "GPTQ (llmcompressor)", "awq": "AWQ (llmcompressor)", "hqq": "HQQ"}


def baseline_python(python: str | None) -> str:
    python = python or DEFAULT_PYTHON
    if not Path(python).is_file():
        raise SystemExit(f"{python}: no such python; create the baselines' environment: python3 -m venv "
                         "/work/venvs/compare && /work/venvs/compare/bin/pip install torch==2.13.0 llmcompressor hqq "
                         "(or name one with --baseline-python)")
    return python


def run_script(kind: str, src: Path, out: Path, python: str, bits: int, group: int, samples: int) -> dict:
    """Run ``kind``'s script on ``src`` into ``out``; returns the info JSON it wrote."""
    cmd = [python, str(BASELINES / SCRIPTS[kind]), str(src), str(out), "--bits", str(bits), "--group", str(group),
           "--seqlen", str(SEQLEN)]
    if kind != "hqq":
        cmd += ["--samples", str(samples)]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if res.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{res.stderr[-3000:]}")
    return json.loads((out / f"{kind}.json").read_text())


def external_row(kind: str, bits: int, group: int, *, key: str, dense, scorer, python: str, work: Path, log,
                 samples: int = 16) -> dict:
    """One row of ``kind`` (gptq, awq, hqq) at ``bits`` / ``group``, scored on both splits."""
    out = work / f"{kind}-{key}-{bits}-{group}"
    t = time.time()
    info = run_script(kind, dense.folder, out, python, bits, group, samples)
    seconds = time.time() - t
    scheme = "hqq" if kind == "hqq" else "rtn"
    nbytes = quantised_bytes(dense, scheme, bits, group)
    if kind == "hqq" and info["bytes"] != nbytes:
        raise RuntimeError(f"HQQ stored {info['bytes']} bytes, counted {nbytes}")
    setting = (f"int{bits}, group {group}" + ("" if kind == "hqq" else f" (min(group, in)), {samples} calibration "
                                                                       "windows"))
    s = scorer.splits_of(out)
    shutil.rmtree(out)
    r = {"model": key, "family": "baseline", "method": NAMES[kind], "setting": setting, "bits": bits, "group": group,
         "bytes": nbytes, "bytes_ratio": nbytes / dense.dense_bytes, "macs": dense.dense_macs, **s["report"],
         "select": s["select"], "seconds": round(seconds, 1)}
    log(f"[{key}] {r['method']} {setting}: bytes {r['bytes_ratio']:.3f} ppl {r['ppl']:.2f} kl {r['kl']:.4f} "
        f"({seconds:.0f} s)")
    return r

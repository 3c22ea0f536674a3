#!/usr/bin/env python3
"""Bit-identical outputs: run a fixed set of demo decompositions with a git revision's code
and with the working tree, and compare the sha256 of every file written.

    python scripts/compare_outputs.py 88067da        # exit 0: identical, 1: a difference

The revision is checked out into a temporary ``git worktree``; both runs use the same copy
of the demo models, the same working directory and the same output paths, one after the
other, so paths recorded in manifests agree. Each run is one call of the library's
``decompose_checkpoint`` with the keyword arguments of :data:`RUNS` (the library's keywords
outlive command-line options moved into a config's ``method:``). JSON files are compared
with their timing fields (``seconds``, ``wall_seconds``, ``collect_seconds``) removed, and
manifests without the keys added deliberately since (:data:`ADDED`, :data:`ADDED_BYTES`);
every other file by its bytes. Tiny calibration (8 x 64 tokens) keeps the whole comparison
to about a minute. The ``int8`` run needs a revision with ``factor_dtype`` (issue 11).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TIMINGS = {"seconds", "wall_seconds", "collect_seconds"}
#: Manifest keys added deliberately after 88067da: the non-layer files written and their checksums.
ADDED = {"written", "side_files"}
#: Keys of the manifest's ``bytes`` added with issue 20: the source's expert bytes and dtype.
ADDED_BYTES = {"experts_source", "ratio_to_source", "source_dtype", "dtypes_from"}
CAL = {"calibration": "demo", "samples": 8, "seqlen": 64}
#: (name, keyword arguments of ``decompose_checkpoint`` besides model and out); the model is
#: the demo model unless the name starts with "mixtral".
RUNS = [
    ("plain", {"ranks": "8,64,32"}),
    ("ratio", {**CAL, "ratio": 0.75, "save_config": "plans/ratio.yaml"}),
    ("refit", {**CAL, "ranks": "16,64,32", "refit": True}),
    ("int8", {"ranks": "8,64,32", "factor_dtype": "int8,core=int4"}),
    ("mixtral", {"ranks": "4,48,32"}),
]
DRIVER = ("import json, sys; from tuckerize.compress import decompose_checkpoint; "
          "decompose_checkpoint(**json.loads(sys.argv[1]))")


def _strip(data):
    if isinstance(data, dict):
        return {k: _strip(v) for k, v in data.items() if k not in TIMINGS}
    if isinstance(data, list):
        return [_strip(v) for v in data]
    return data


def digest(path: Path) -> str:
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text())
        except ValueError:
            pass
        else:
            if path.name == "tuckerize_manifest.json":
                data = {k: v for k, v in data.items() if k not in ADDED}
                data["bytes"] = {k: v for k, v in data.get("bytes", {}).items() if k not in ADDED_BYTES}
            return "json:" + hashlib.sha256(json.dumps(_strip(data), sort_keys=True).encode()).hexdigest()
    return hashlib.sha256(path.read_bytes()).hexdigest()


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): digest(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def run_all(code: Path, models: Path, work: Path) -> dict[str, str]:
    """Every run of RUNS with the package at ``code``; relative path -> digest."""
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    env = {**os.environ, "PYTHONPATH": str(code), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("TUCKERIZE_DEBUG", None)
    for name, kwargs in RUNS:
        model = models / ("mixtral" if name.startswith("mixtral") else "model")
        call = json.dumps({"model": str(model), "out": f"out/{name}", **kwargs})
        cmd = [sys.executable, "-c", DRIVER, call]
        done = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"decompose_checkpoint(**{call}) failed with the code at {code}:\n{done.stderr[-2000:]}")
    return snapshot(work)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("revision", help="git revision to compare the working tree against, e.g. 88067da")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder (its path is printed)")
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="tuckerize-compare-"))
    base = tmp / "base"
    try:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(base), a.revision], check=True)
        models = tmp / "models"
        models.mkdir()
        for name in ("model", "mixtral"):  # one copy of the demo models, read by both runs
            shutil.copytree(ROOT / "tuckerize" / "demo" / name, models / name)
        before = run_all(base, models, tmp / "work")
        after = run_all(ROOT, models, tmp / "work")
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base)], check=False)
        if not a.keep:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"kept {tmp}")
    differ = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    for k in differ:
        print(f"DIFFERS {k}: {before.get(k, 'missing')} -> {after.get(k, 'missing')}")
    print(f"{len(before)} files with {a.revision}, {len(after)} with the working tree, {len(differ)} differ")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())

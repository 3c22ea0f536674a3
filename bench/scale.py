"""Decompose a Qwen3-30B-A3B-shaped checkpoint with 1 and 2 processes (torchrun, gloo).

Generates locally (bench/memory.py's generator: hidden 2048, 128 experts of intermediate
768, 32/4 heads of 128, a small vocabulary) a bf16 checkpoint of ``--layers`` MoE layers,
then, in fresh processes:

* read: every MoE layer's three stacked projections (bench/fp8.py's reader: read and
  convert to float32 ``[E, H, I]``), nothing else: per-layer wall and CPU time;
* ``tuckerize decompose --ranks 64,512,256`` in one process, then
  ``torchrun --nproc_per_node 2 -m tuckerize decompose`` with the same arguments: total wall
  time, and per process its wall time, CPU time (user + system) and peak RSS (each process
  records its own ``getrusage``); per-layer wall time from the manifest (reading included).

The two outputs are checked byte-identical (manifest timings aside). Everything scales
with the layers, so the 48-layer estimate is measured x 48 / layers; with N processes the
layers divide, so the estimate is per-process work x 48 / layers. The load average is
printed: on a shared machine, CPU time is the comparable number.

    python bench/scale.py                  # 4 layers, about 15 minutes on 2 idle cores
    python bench/scale.py --layers 2 --dir /tmp/tk-scale --keep
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import fp8  # noqa: E402  (the stacked-projection reader and the process wrapper)
import memory  # noqa: E402  (the Qwen3-30B-A3B-shaped generator)

#: The CLI in this process; on exit writes this process's wall, CPU and peak RSS to DIR/rank-R.json.
USAGE = r"""
import json, os, resource, sys, time
t = time.time()
try:
    from tuckerize.cli import app
    app(prog_name="tuckerize", args=sys.argv[2:])
finally:
    u = resource.getrusage(resource.RUSAGE_SELF)
    with open(os.path.join(sys.argv[1], "rank-%s.json" % os.environ.get("RANK", "0")), "w") as f:
        json.dump({"wall": time.time() - t, "cpu": u.ru_utime + u.ru_stime, "maxrss_kib": u.ru_maxrss}, f)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def decompose(nproc: int, src: Path, out: Path, ranks: str, usage: Path, script: Path) -> dict:
    usage.mkdir(parents=True, exist_ok=True)
    args = ["decompose", "--model", str(src), "--ranks", ranks, "--out", str(out), "--overwrite", "--json"]
    if nproc == 1:
        cmd = [sys.executable, str(script), str(usage), *args]
    else:
        torchrun = Path(sys.executable).with_name("torchrun")
        cmd = [str(torchrun), "--nproc_per_node", str(nproc), "--rdzv-backend=c10d",
               f"--rdzv-endpoint=127.0.0.1:{free_port()}", str(script), str(usage), *args]
    t = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.time() - t
    if r.returncode != 0:
        raise SystemExit(f"{nproc} processes failed: {r.stderr[-3000:]}")
    procs = [json.loads((usage / f"rank-{k}.json").read_text()) for k in range(nproc)]
    manifest = json.loads((out / "tuckerize_manifest.json").read_text())
    layer_s = [e["seconds"] for e in manifest["files"].values() if e["layer"] is not None and e["errors"]]
    return {"wall": wall, "procs": procs, "layer_wall_s": sum(layer_s) / len(layer_s), "layers": len(layer_s)}


def contents(folder: Path) -> dict[str, str]:
    drop = {"seconds", "wall_seconds", "collect_seconds", "out"}

    def strip(d):
        if isinstance(d, dict):
            return {k: strip(v) for k, v in d.items() if k not in drop}
        return [strip(v) for v in d] if isinstance(d, list) else d

    return {p.name: (json.dumps(strip(json.loads(p.read_text())), sort_keys=True) if p.suffix == ".json"
                     else hashlib.sha256(p.read_bytes()).hexdigest()) for p in sorted(folder.iterdir())}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--dir", default="/tmp/tuckerize-bench-scale")
    ap.add_argument("--ranks", default="64,512,256")
    ap.add_argument("--keep", action="store_true", help="keep the generated checkpoint")
    args = ap.parse_args()
    root = Path(args.dir)
    src = root / "bf16"
    if not (src / "config.json").is_file():
        t = time.time()
        memory.write_checkpoint(src, args.layers, torch.Generator().manual_seed(0), vocab=args.vocab)
        print(f"generated {src} in {time.time() - t:.0f} s", flush=True)
    script = root / "usage.py"
    script.write_text(USAGE)
    read = json.loads(fp8.run_all({"read": [sys.executable, "-c", fp8.READ, str(src)]})["read"]["stdout"][-1])
    n = len(read["wall"])
    read_wall, read_cpu = sum(read["wall"]) / n, sum(read["cpu"]) / n
    print(json.dumps({"read_per_layer": {"wall": read_wall, "cpu": read_cpu}}), flush=True)
    loads = [os.getloadavg()[0]]
    runs = {}
    for nproc in (1, 2):
        runs[nproc] = decompose(nproc, src, root / f"out-{nproc}", args.ranks, root / f"usage-{nproc}", script)
        loads.append(os.getloadavg()[0])
        print(json.dumps({f"{nproc} processes": runs[nproc]}), flush=True)
    identical = contents(root / "out-1") == contents(root / "out-2")

    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; "
          f"load average (1 min) before / after 1 process / after 2 processes: "
          + " / ".join(f"{x:.1f}" for x in loads))
    print(f"read per MoE layer (stack 3 projections to float32): wall {read_wall:.1f} s, CPU {read_cpu:.1f} s; "
          f"48 layers: CPU {read_cpu * 48 / 60:.1f} min (one process), {read_cpu * 48 / 2 / 60:.1f} min per process "
          "with 2 (each reads only its layers)")
    print("\n| processes | wall (s) | per process: wall (s) / CPU (s) / peak RSS (GiB) | wall per MoE layer (s) | "
          "48 layers: wall at this load (min) | 48 layers: CPU per process (min) |")
    print("|---:|---:|---|---:|---:|---:|")
    for nproc, r in runs.items():
        per = "; ".join(f"{p['wall']:.0f} / {p['cpu']:.0f} / {p['maxrss_kib'] / 2**20:.2f}" for p in r["procs"])
        cpu_max = max(p["cpu"] for p in r["procs"])
        print(f"| {nproc} | {r['wall']:.0f} | {per} | {r['layer_wall_s']:.0f} | {r['wall'] * 48 / n / 60:.0f} | "
              f"{cpu_max * 48 / n / 60:.0f} |")
    w1, w2 = runs[1]["wall"], runs[2]["wall"]
    print(f"\nspeed-up 2 vs 1 process: wall {w1 / w2:.2f}x (efficiency {w1 / w2 / 2:.0%}); "
          f"outputs byte-identical (manifest timings aside): {identical}")
    if not args.keep:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()

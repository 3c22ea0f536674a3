"""Decompose a Qwen3-30B-A3B-shaped checkpoint stored in bf16 and in block FP8.

Generates locally (bench/memory.py's generator: hidden 2048, 128 experts of intermediate
768, 32/4 heads of 128, here a small vocabulary) a bf16 checkpoint of ``--layers`` MoE
layers, and from it the same weights quantised to block FP8 as DeepSeek-V3 and Qwen's ``-FP8``
releases store them (every projection weight e4m3 with a float32 ``weight_scale_inv`` per
128x128 block; norms, router and embeddings left in bf16). Then, for each, in fresh
processes:

* read: every MoE layer's three stacked projections (``stack_projection``: read, and for
  FP8 dequantise, to float32 ``[E, H, I]``), nothing else, per layer wall and CPU time;
* decompose: ``tuckerize decompose --ranks 64,512,256``, one process per checkpoint: wall
  time, CPU time (user + system), peak RSS, per-layer wall time from the manifest.

Everything in these checkpoints (hashing, reading, decomposing) scales with the number of
layers, so the 48-layer estimate is the measured time times 48 / layers; the reading time is
shown on its own. On a shared machine the CPU time is the number to compare (wall time
depends on the load; ``--together`` runs both decompositions at once so that both see the
same load). Files are read from the page cache right after they were written (warm), so
"read" is parsing, conversion and dequantisation, not disk.

    python bench/fp8.py                       # 4 layers, about 20 minutes on 2 idle cores
    python bench/fp8.py --layers 2 --dir /tmp/tk-fp8 --keep
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import memory  # noqa: E402  (the Qwen3-30B-A3B-shaped generator and the peak-RSS wrapper)

BLOCK = (128, 128)
FP8_MAX = 448.0  # largest finite float8_e4m3fn
QUANT_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": list(BLOCK),
                "activation_scheme": "dynamic"}


def quantize(name: str, t: torch.Tensor) -> dict[str, torch.Tensor]:
    """Block FP8 of one 2-D projection weight (per 128x128 block: amax / 448); others as they are."""
    if t.ndim != 2 or not name.endswith("_proj.weight"):
        return {name: t}
    O, I = t.shape
    b0, b1 = BLOCK
    n0, n1 = -(-O // b0), -(-I // b1)
    w = torch.nn.functional.pad(t.float(), (0, n1 * b1 - I, 0, n0 * b0 - O)).reshape(n0, b0, n1, b1)
    scale = (w.abs().amax(dim=(1, 3)) / FP8_MAX).clamp(min=1e-12)
    q = (w / scale[:, None, :, None]).reshape(n0 * b0, n1 * b1)[:O, :I].to(torch.float8_e4m3fn)
    return {name: q, name + "_scale_inv": scale}


def write_fp8(src: Path, folder: Path) -> None:
    """Block FP8 of the bf16 checkpoint ``src``, one file at a time."""
    from safetensors.torch import load_file, save_file

    folder.mkdir(parents=True, exist_ok=True)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    weight_map = {}
    for f in sorted(set(index["weight_map"].values())):
        t = {k2: v2 for k, v in load_file(str(src / f)).items() for k2, v2 in quantize(k, v).items()}
        save_file(t, str(folder / f), metadata={"format": "pt"})
        weight_map.update({k: f for k in t})
        del t
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = QUANT_CONFIG
    (folder / "config.json").write_text(json.dumps(cfg, indent=1))


READ = """
import json, sys, time
from pathlib import Path
from tuckerize.arch import PROJECTIONS, moe_spec
from tuckerize.checkpoint import Checkpoint, load_config
from tuckerize.experts import stack_projection
spec = moe_spec(load_config(Path(sys.argv[1])))
ckpt = Checkpoint.open(sys.argv[1])
wall, cpu = [], []
for layer in spec.moe_layers:
    t, c = time.time(), time.process_time()
    for p in PROJECTIONS:
        w = stack_projection(ckpt, spec, layer, p)
        del w
    wall.append(time.time() - t)
    cpu.append(time.process_time() - c)
print(json.dumps({"wall": wall, "cpu": cpu}))
"""

#: Runs a command as its child; prints the child's peak RSS, wall and CPU (user + system) time.
WRAP = (
    "import resource, subprocess, sys, time, json; t=time.time(); r=subprocess.run(sys.argv[1:]); "
    "u=resource.getrusage(resource.RUSAGE_CHILDREN); "
    "print(json.dumps({'rc': r.returncode, 'maxrss_kib': u.ru_maxrss, 'cpu': u.ru_utime + u.ru_stime, "
    "'wall': time.time()-t}))"
)


def run_all(cmds: dict[str, list[str]]) -> dict[str, dict]:
    """Start every command at once (each in its own wrapper); wait; their measurements."""
    procs = {k: subprocess.Popen([sys.executable, "-c", WRAP, *c], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True) for k, c in cmds.items()}
    out = {}
    for k, p in procs.items():
        stdout, stderr = p.communicate()
        lines = stdout.strip().splitlines()
        info = json.loads(lines[-1])
        if info["rc"] != 0:
            raise SystemExit(f"{k} failed: {stderr[-2000:]}")
        info["stdout"] = lines[:-1]
        out[k] = info
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--dir", default="/tmp/tuckerize-bench-fp8")
    ap.add_argument("--ranks", default="64,512,256")
    ap.add_argument("--keep", action="store_true", help="keep the generated checkpoints")
    ap.add_argument("--together", action="store_true",
                    help="decompose the two checkpoints at the same time (a loaded machine: same conditions)")
    args = ap.parse_args()
    root = Path(args.dir)
    sources = {"bf16": root / "bf16", "fp8": root / "fp8"}
    if not (sources["bf16"] / "config.json").is_file():
        t = time.time()
        memory.write_checkpoint(sources["bf16"], args.layers, torch.Generator().manual_seed(0), vocab=args.vocab)
        print(f"generated {sources['bf16']} in {time.time() - t:.0f} s", flush=True)
    if not (sources["fp8"] / "config.json").is_file():
        t = time.time()
        write_fp8(sources["bf16"], sources["fp8"])
        print(f"quantised to {sources['fp8']} in {time.time() - t:.0f} s", flush=True)

    reads = {k: json.loads(run_all({k: [sys.executable, "-c", READ, str(src)]})[k]["stdout"][-1])
             for k, src in sources.items()}
    print(json.dumps({"read": reads}), flush=True)
    tucker = Path(sys.executable).with_name("tuckerize")
    cmds = {k: [str(tucker), "decompose", "--model", str(src), "--ranks", args.ranks, "--out", str(root / f"out-{k}"),
                "--overwrite", "--json"] for k, src in sources.items()}
    runs = run_all(cmds) if args.together else {k: run_all({k: c})[k] for k, c in cmds.items()}
    rows = {}
    for kind, src in sources.items():
        run = runs[kind]
        manifest = json.loads((root / f"out-{kind}" / "tuckerize_manifest.json").read_text())
        layer_s = [e["seconds"] for e in manifest["files"].values() if e["layer"] is not None and e["errors"]]
        n = len(layer_s)
        r = rows[kind] = {
            "source_gib": sum(f.stat().st_size for f in src.iterdir()) / 2**30,
            "expert_dtypes": manifest["source"]["expert_dtypes"],
            "wall_s": run["wall"], "cpu_s": run["cpu"], "peak_rss_gib": run["maxrss_kib"] / 2**20,
            "layer_wall_s": sum(layer_s) / n,
            "read_wall_s": sum(reads[kind]["wall"]) / n, "read_cpu_s": sum(reads[kind]["cpu"]) / n,
            "mean_rel_error": sum(t["relative_error"] for t in manifest["tensors"]) / len(manifest["tensors"]),
        }
        # every part of this checkpoint (hashing, reading, decomposing) scales with its layers
        r["cpu_48_min"] = run["cpu"] * 48 / n / 60
        r["wall_48_min"] = run["wall"] * 48 / n / 60
        r["read_cpu_48_min"] = r["read_cpu_s"] * 48 / 60
        print(json.dumps({kind: r}), flush=True)

    load = os.getloadavg()
    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}, load average at the end {load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f} (1/5/15 min)")
    print("\n| source | size (GiB) | wall (s) | CPU (s) | peak RSS (GiB) | wall per MoE layer (s) | "
          "read per layer, wall / CPU (s) | 48 layers: CPU (min) | of which read (min) | wall at this load (min) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for kind, r in rows.items():
        print(f"| {kind} | {r['source_gib']:.2f} | {r['wall_s']:.0f} | {r['cpu_s']:.0f} | {r['peak_rss_gib']:.2f} | "
              f"{r['layer_wall_s']:.0f} | {r['read_wall_s']:.1f} / {r['read_cpu_s']:.1f} | {r['cpu_48_min']:.0f} | "
              f"{r['read_cpu_48_min']:.1f} | {r['wall_48_min']:.0f} |")
    b, f = rows["bf16"], rows["fp8"]
    print(f"\nfp8 / bf16: CPU {f['cpu_s'] / b['cpu_s']:.2f}x, wall {f['wall_s'] / b['wall_s']:.2f}x, "
          f"read CPU {f['read_cpu_s'] / b['read_cpu_s']:.2f}x, peak RSS {f['peak_rss_gib'] / b['peak_rss_gib']:.2f}x; "
          f"mean relative error {b['mean_rel_error']:.4f} (bf16) vs {f['mean_rel_error']:.4f} (fp8)")
    if not args.keep:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()

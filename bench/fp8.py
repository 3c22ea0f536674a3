"""Decompose a Qwen3-30B-A3B-shaped checkpoint stored in bf16 and in block FP8.

Generates locally (bench/memory.py's generator: hidden 2048, 128 experts of intermediate
768, 32/4 heads of 128, here a small vocabulary) a bf16 checkpoint of ``--layers`` MoE
layers, and from it the same weights quantised to block FP8 as DeepSeek-V3 and Qwen's ``-FP8``
releases store them (every projection weight e4m3 with a float32 ``weight_scale_inv`` per
128x128 block; norms, router and embeddings left in bf16). Then, for each, in fresh
processes:

* read: every MoE layer's three stacked projections (``stack_projection``: read, and for
  FP8 dequantise, to float32 ``[E, H, I]``), nothing else, timed per layer;
* decompose: ``tuckerize decompose --ranks 64,512,256`` in one process: wall time, peak
  RSS, per-layer seconds from the manifest.

The time per layer is extrapolated to Qwen3-30B-A3B's 48 layers; reading is shown on its
own. Files are read from the page cache right after they were written (warm), so "read"
is parsing, conversion and dequantisation, not disk.

    python bench/fp8.py                       # 4 layers, about 20 minutes on 2 cores
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
from tuckerize.arch import PROJECTIONS, moe_spec
from tuckerize.checkpoint import Checkpoint, load_config
from tuckerize.experts import stack_projection
src = sys.argv[1]
spec = moe_spec(load_config(__import__('pathlib').Path(src)))
ckpt = Checkpoint.open(src)
per_layer = []
for layer in spec.moe_layers:
    t = time.time()
    for p in PROJECTIONS:
        w = stack_projection(ckpt, spec, layer, p)
        del w
    per_layer.append(time.time() - t)
print(json.dumps(per_layer))
"""


def read_times(src: Path) -> list[float]:
    out = subprocess.run([sys.executable, "-c", READ, str(src)], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"reading {src} failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--dir", default="/tmp/tuckerize-bench-fp8")
    ap.add_argument("--ranks", default="64,512,256")
    ap.add_argument("--keep", action="store_true", help="keep the generated checkpoints")
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

    tucker = Path(sys.executable).with_name("tuckerize")
    rows = {}
    for kind, src in sources.items():
        reads = read_times(src)
        out = root / f"out-{kind}"
        gib, secs = memory.peak_rss_of([str(tucker), "decompose", "--model", str(src), "--ranks", args.ranks,
                                        "--out", str(out), "--overwrite", "--json"])
        manifest = json.loads((out / "tuckerize_manifest.json").read_text())
        moe_files = [e for e in manifest["files"].values() if e["layer"] is not None and e["errors"]]
        layer_s = [e["seconds"] for e in moe_files]
        other_s = secs - sum(layer_s)
        rows[kind] = {
            "source_gib": sum(f.stat().st_size for f in src.iterdir()) / 2**30,
            "expert_dtypes": manifest["source"]["expert_dtypes"],
            "wall_s": secs, "peak_rss_gib": gib,
            "layer_s": sum(layer_s) / len(layer_s), "read_s": sum(reads) / len(reads),
            "other_s": other_s,
            "mean_rel_error": sum(t["relative_error"] for t in manifest["tensors"]) / len(manifest["tensors"]),
        }
        r = rows[kind]
        r["decompose_s"] = r["layer_s"] - r["read_s"]
        r["est_48_s"] = 48 * r["layer_s"] + other_s
        print(json.dumps({kind: r}), flush=True)

    load = os.getloadavg()
    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}, load average at the end {load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f} (1/5/15 min)")
    print("\n| source | size (GiB) | wall, 1 process (s) | peak RSS (GiB) | per MoE layer (s) | of which read (s) | "
          "decompose (s) | 48 layers, est. (min) | of which read (min) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for kind, r in rows.items():
        print(f"| {kind} | {r['source_gib']:.2f} | {r['wall_s']:.0f} | {r['peak_rss_gib']:.2f} | "
              f"{r['layer_s']:.1f} | {r['read_s']:.1f} | {r['decompose_s']:.1f} | {r['est_48_s'] / 60:.0f} | "
              f"{48 * r['read_s'] / 60:.1f} |")
    b, f = rows["bf16"], rows["fp8"]
    print(f"\nfp8 / bf16: wall {f['wall_s'] / b['wall_s']:.2f}x, read {f['read_s'] / b['read_s']:.2f}x, "
          f"peak RSS {f['peak_rss_gib'] / b['peak_rss_gib']:.2f}x; "
          f"mean relative error {b['mean_rel_error']:.4f} (bf16) vs {f['mean_rel_error']:.4f} (fp8)")
    if not args.keep:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()

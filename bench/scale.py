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

``--calibration``: the calibrated decompose instead (``--calibration demo --samples S
--seqlen L``; by default the product's per-expert whitening, ``--whitening pooled`` and
``--als-iters`` set through a ``method:`` config; the statistics collected are the same
either way). Per-expert whitening at these shapes peaks near 14 GiB per process: two such
processes need a machine with more than 28 GiB. The checkpoint gets the demo model's tokenizer (its
vocabulary is the generated 4,096). Per process also the wall and CPU time spent in
``collect_statistics`` (the statistics; the rest is hashing, reading, decomposing and
writing); per MoE layer the manifest's ``collect_seconds`` (statistics, rank 0) and
``seconds`` (decomposition, reading included, the rank that wrote the layer). With N
processes every rank runs every layer over 1/N of the windows and the statistics are
summed with all_reduce, so the outputs agree up to summation order: the bench reports
whether they are byte-identical and else the largest relative difference of any tensor
(factors, cores, statistics; ``tests/decompose/test_torchrun_decompose.py`` bounds it at
1e-6 for factors and 1e-9 for the statistics).

    python bench/scale.py                  # 4 layers, about 15 minutes on 2 idle cores
    python bench/scale.py --layers 2 --dir /tmp/tk-scale --keep
    OMP_NUM_THREADS=1 python bench/scale.py --calibration --layers 2 --samples 32 --seqlen 256 --whitening pooled
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

#: The CLI in this process; on exit writes this process's wall, CPU and peak RSS to DIR/rank-R.json,
#: and the wall and CPU time spent collecting calibration statistics (0 without calibration).
USAGE = r"""
import json, os, resource, sys, time
import tuckerize.calibration.collect as collect
t = time.time()
stats = {"stats_wall": 0.0, "stats_cpu": 0.0}
real = collect.collect_statistics
def timed(*a, **k):
    w, c = time.time(), time.process_time()
    try:
        return real(*a, **k)
    finally:
        stats["stats_wall"] += time.time() - w
        stats["stats_cpu"] += time.process_time() - c
collect.collect_statistics = timed
try:
    from tuckerize.cli import app
    app(prog_name="tuckerize", args=sys.argv[2:])
finally:
    u = resource.getrusage(resource.RUSAGE_SELF)
    with open(os.path.join(sys.argv[1], "rank-%s.json" % os.environ.get("RANK", "0")), "w") as f:
        json.dump({"wall": time.time() - t, "cpu": u.ru_utime + u.ru_stime, "maxrss_kib": u.ru_maxrss, **stats}, f)
"""

#: The demo model's tokenizer (vocabulary 4,096, the generated checkpoint's default) and text.
DEMO = Path(__file__).resolve().parents[1] / "tuckerize" / "demo" / "model"
TOKENIZER = ("tokenizer.json", "tokenizer_config.json")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def decompose(nproc: int, src: Path, out: Path, ranks: str, usage: Path, script: Path, extra: list[str]) -> dict:
    usage.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out, ignore_errors=True)  # --overwrite would reuse the calibration statistics found there
    args = ["decompose", "--model", str(src), "--ranks", ranks, "--out", str(out), "--overwrite", "--json", *extra]
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
    layers = [e for e in manifest["files"].values() if e["layer"] is not None and e["errors"]]
    layer_s = [e["seconds"] for e in layers]
    result = {"wall": wall, "procs": procs, "layer_wall_s": sum(layer_s) / len(layer_s), "layers": len(layer_s)}
    if "calibration" in manifest:
        result["per_layer"] = {e["layer"]: {"collect": e["collect_seconds"], "decompose": e["seconds"]} for e in layers}
        result["collect_seconds"] = manifest["calibration"]["collect_seconds"]
    return result


def contents(folder: Path) -> dict[str, str]:
    drop = {"seconds", "wall_seconds", "collect_seconds", "out"}

    def strip(d):
        if isinstance(d, dict):
            return {k: strip(v) for k, v in d.items() if k not in drop}
        return [strip(v) for v in d] if isinstance(d, list) else d

    return {p.name: (json.dumps(strip(json.loads(p.read_text())), sort_keys=True) if p.suffix == ".json"
                     else hashlib.sha256(p.read_bytes()).hexdigest()) for p in sorted(folder.iterdir())}


def max_difference(a: Path, b: Path) -> dict[str, float]:
    """Largest relative difference (Frobenius) of two outputs, by kind: ``statistics``
    (calibration_stats.safetensors, as stored), ``other`` (tensors kept from the source),
    ``factors`` (U_E, U_H, U_I, cores), ``subspace`` (the projector ``U U^T`` of each factor:
    a basis rotated inside a cluster of near-equal singular values differs as factors, not
    here), ``reconstruction`` (each projection's ``core x U_E x U_H x U_I`` [E, H, I]) and
    ``errors`` (the manifest's relative and whitened errors)."""
    from safetensors.torch import load_file

    def rel(x: torch.Tensor, y: torch.Tensor) -> float:
        return float(torch.linalg.norm(x.double() - y.double())) / (float(torch.linalg.norm(x.double())) or 1.0)

    worst = dict.fromkeys(("statistics", "other", "factors", "subspace", "reconstruction", "errors"), 0.0)
    for p in sorted(a.glob("*.safetensors")):
        one, two = load_file(str(p)), load_file(str(b / p.name))
        if sorted(one) != sorted(two):
            raise SystemExit(f"{p.name}: the two outputs hold different tensors")
        for name, x in one.items():
            kind = ("statistics" if p.name.startswith("calibration") else
                    "factors" if name.endswith(("U_E", "U_H", "U_I", "core")) else "other")
            worst[kind] = max(worst[kind], rel(x, two[name]))
            if name.endswith(("U_E", "U_H", "U_I")):
                worst["subspace"] = max(worst["subspace"], rel(x @ x.T, two[name] @ two[name].T))
        for prefix in sorted({n[: -len(".core")] for n in one if n.endswith(".core")}):
            rec = [torch.einsum("abc,ea,hb,ic->ehi", *(t[f"{prefix}.{f}"] for f in ("core", "U_E", "U_H", "U_I")))
                   for t in (one, two)]
            worst["reconstruction"] = max(worst["reconstruction"], rel(*rec))
            del rec
    tensors = [json.loads((f / "tuckerize_manifest.json").read_text())["tensors"] for f in (a, b)]
    for t1, t2 in zip(*tensors):
        for k in ("relative_error", "whitened_error"):
            if t1.get(k) is not None:
                worst["errors"] = max(worst["errors"], abs(t1[k] - t2[k]) / abs(t1[k]))
    return worst


def add_tokenizer(src: Path) -> None:
    for name in TOKENIZER:
        if not (src / name).is_file():
            shutil.copyfile(DEMO / name, src / name)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--dir", default="/tmp/tuckerize-bench-scale")
    ap.add_argument("--ranks", default="64,512,256")
    ap.add_argument("--keep", action="store_true", help="keep the generated checkpoint")
    ap.add_argument("--calibration", action="store_true",
                    help="the calibrated decompose (demo text, per-expert whitening); statistics time per layer")
    ap.add_argument("--samples", type=int, default=16, help="calibration windows (with --calibration)")
    ap.add_argument("--seqlen", type=int, default=256, help="tokens per calibration window (with --calibration)")
    ap.add_argument("--whitening", choices=("expert", "pooled"), default=None,
                    help="with --calibration (default: the product's, expert)")
    ap.add_argument("--als-iters", type=int, default=None,
                    help="sweeps of the per-expert ALS (with --calibration; default: the product's)")
    args = ap.parse_args()
    root = Path(args.dir)
    src = root / "bf16"
    if not (src / "config.json").is_file():
        t = time.time()
        memory.write_checkpoint(src, args.layers, torch.Generator().manual_seed(0), vocab=args.vocab)
        print(f"generated {src} in {time.time() - t:.0f} s", flush=True)
    extra: list[str] = []
    if args.calibration:
        add_tokenizer(src)
        extra = ["--calibration", "demo", "--samples", str(args.samples), "--seqlen", str(args.seqlen)]
        method = {k: v for k, v in (("whitening", args.whitening), ("als_iters", args.als_iters)) if v is not None}
        if method:
            (root / "method.yaml").write_text("method:\n" + "".join(f"  {k}: {v}\n" for k, v in method.items()))
            extra += ["--config", str(root / "method.yaml")]
    script = root / "usage.py"
    script.write_text(USAGE)
    read = json.loads(fp8.run_all({"read": [sys.executable, "-c", fp8.READ, str(src)]})["read"]["stdout"][-1])
    n = len(read["wall"])
    read_wall, read_cpu = sum(read["wall"]) / n, sum(read["cpu"]) / n
    print(json.dumps({"read_per_layer": {"wall": read_wall, "cpu": read_cpu}}), flush=True)
    loads = [os.getloadavg()[0]]
    runs = {}
    for nproc in (1, 2):
        runs[nproc] = decompose(nproc, src, root / f"out-{nproc}", args.ranks, root / f"usage-{nproc}", script, extra)
        loads.append(os.getloadavg()[0])
        print(json.dumps({f"{nproc} processes": runs[nproc]}), flush=True)
    identical = contents(root / "out-1") == contents(root / "out-2")
    if args.calibration:
        report_calibration(args, runs, loads, n, read_wall, read_cpu, identical,
                           None if identical else max_difference(root / "out-1", root / "out-2"))
        if not args.keep:
            shutil.rmtree(root)
        return

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


def report_calibration(args, runs, loads, n, read_wall, read_cpu, identical, diff) -> None:
    """The calibrated runs' tables (Markdown) and the 2-vs-1 ratios."""
    tokens = args.samples * args.seqlen
    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; "
          f"{n} MoE layers; calibration {args.samples} x {args.seqlen} = {tokens:,} tokens; whitening "
          f"{args.whitening or 'default (expert)'}, ALS sweeps {args.als_iters if args.als_iters is not None else 'default'}; "
          "load average (1 min) before / "
          "after 1 process / after 2 processes: " + " / ".join(f"{x:.1f}" for x in loads))
    print(f"read per MoE layer (stack 3 projections to float32): wall {read_wall:.1f} s, CPU {read_cpu:.1f} s")
    print("\n| processes | wall (s) | per process: wall / CPU (s) / peak RSS (GiB) | per process: statistics wall / CPU (s) "
          "| per process: rest (hash, read, decompose, write) CPU (s) |")
    print("|---:|---:|---|---|---|")
    for nproc, r in runs.items():
        per = "; ".join(f"{p['wall']:.0f} / {p['cpu']:.0f} / {p['maxrss_kib'] / 2**20:.2f}" for p in r["procs"])
        st = "; ".join(f"{p['stats_wall']:.1f} / {p['stats_cpu']:.1f}" for p in r["procs"])
        rest = "; ".join(f"{p['cpu'] - p['stats_cpu']:.0f}" for p in r["procs"])
        print(f"| {nproc} | {r['wall']:.0f} | {per} | {st} | {rest} |")
    print("\n| processes | MoE layer | statistics (s, rank 0) | decomposition (s, reading included) |")
    print("|---:|---:|---:|---:|")
    for nproc, r in runs.items():
        for layer, t in sorted(r["per_layer"].items()):
            print(f"| {nproc} | {layer} | {t['collect']:.1f} | {t['decompose']:.1f} |")
    one, two = runs[1], runs[2]

    def mean(r, k):
        return sum(p[k] for p in r["procs"]) / len(r["procs"])

    def per_layer(r, k):
        return sum(t[k] for t in r["per_layer"].values()) / len(r["per_layer"])

    print(f"\n2 processes / 1: wall {one['wall'] / two['wall']:.2f}x (efficiency {one['wall'] / two['wall'] / 2:.0%}); "
          f"statistics per process: wall {mean(one, 'stats_wall') / mean(two, 'stats_wall'):.2f}x, "
          f"CPU {mean(one, 'stats_cpu') / mean(two, 'stats_cpu'):.2f}x; statistics per layer (manifest) "
          f"{per_layer(one, 'collect') / per_layer(two, 'collect'):.2f}x; decomposition per layer "
          f"{per_layer(two, 'decompose') / per_layer(one, 'decompose'):.2f}x of one process's; "
          f"statistics CPU per layer per 1,000 tokens, 1 process: "
          f"{mean(one, 'stats_cpu') / n / tokens * 1000:.2f} s")
    if identical:
        print("outputs: byte-identical (manifest timings aside)")
    else:
        print("outputs: not byte-identical; largest relative difference (Frobenius) of: "
              + ", ".join(f"{k} {v:.1e}" for k, v in diff.items()))


if __name__ == "__main__":
    main()

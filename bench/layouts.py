"""Tensor-parallel layouts of the Tucker experts: arithmetic, communication and time per layer.

Part 1 (no processes): per rank and per token, one MoE layer with Qwen3-30B-A3B shapes
(E=128, H=2048, I=768, top-8), the slowest rank's multiply-adds and the values a rank
sends, for dense tensor parallelism and every Tucker layout, N = 1, 2, 4, 8, computed by
``tuckerize.runtime.layout.layer_costs`` from the shapes of the modules each rank builds
(on the meta device). ``vs /N`` is the layout's MACs over (single-device Tucker)/N.

Part 2 (``--measure``): real gloo processes (``--tp``, default 2) on this machine's
CPUs. (a) The candidate collectives at the sizes the layouts use (all-reduce and
all-gather of r_H and H values per token), which decide hybrid's schedule. (b) Time per
MoE layer (experts only: routing given) for dense TP and every layout, with synthetic
weights of Qwen3-30B-A3B shapes, in one run; dense TP is the baseline.

    python bench/layouts.py                        # the table
    python bench/layouts.py --measure --tp 2       # plus collectives and time per layer
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import tempfile
import time
from datetime import timedelta
from pathlib import Path

E, H, I, K = 128, 2048, 768, 8
RANK_SETS = ((64, 512, 256), (128, 1024, 512))


def table(rank_sets=RANK_SETS, worlds=(1, 2, 4, 8)) -> list[dict]:
    from tuckerize.parallel import LAYOUTS
    from tuckerize.runtime.layout import layer_costs

    rows = []
    for ranks in rank_sets:
        plan = {p: ranks for p in ("gate", "up", "down")}
        single = layer_costs((E, H, I), K, plan, "intermediate", 1)["macs"]
        for n in worlds:
            dense = layer_costs((E, H, I), K, plan, "dense", n)
            row = {"ranks": ranks, "N": n, "dense": dense}
            for layout in LAYOUTS:
                c = layer_costs((E, H, I), K, plan, layout, n)
                c["vs_single_over_N"] = c["macs"] / (single / n)
                row[layout] = c
            rows.append(row)
    return rows


def print_table(rows) -> None:
    from tuckerize.parallel import LAYOUTS

    head = "| ranks (r_E,r_H,r_I) | N | dense TP MACs (sent) | " + " | ".join(
        f"`{l}` MACs (x dense speed-up; vs /N; sent)" for l in LAYOUTS) + " |"
    print(head)
    print("|---|---:|---:|" + "---:|" * len(LAYOUTS))
    for r in rows:
        d = r["dense"]
        cells = [f"{r[l]['macs'] / 1e6:.2f}M ({d['macs'] / r[l]['macs']:.2f}x; {r[l]['vs_single_over_N']:.2f}; "
                 f"{r[l]['sent']:.0f})" for l in LAYOUTS]
        print(f"| {','.join(map(str, r['ranks']))} | {r['N']} | {d['macs'] / 1e6:.2f}M ({d['sent']:.0f}) | "
              + " | ".join(cells) + " |")


# ------------------------------------------------------------------------------ measured


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _timeit(fn, min_time: float, min_reps: int = 3, max_reps: int = 50) -> float:
    import torch.distributed as dist

    fn()
    times = []
    start = time.perf_counter()
    while True:
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        # every rank must agree on when to stop (one flag all-reduced)
        import torch

        flag = torch.tensor([1.0 if (len(times) >= min_reps and (time.perf_counter() - start > min_time
                                                                 or len(times) >= max_reps)) else 0.0])
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        if flag.item() == 1.0:
            break
    return statistics.median(times)


def _worker(rank: int, world: int, init: str, args: dict, out: str) -> None:
    import torch
    import torch.distributed as dist

    from tuckerize.parallel import LAYOUTS, ParallelContext
    from tuckerize.runtime.moe import DenseExperts
    from tuckerize.runtime.tucker_experts import TuckerExperts

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world, timeout=timedelta(seconds=600))
    ctx = ParallelContext(rank=rank, world=world)
    results: dict = {"collectives": [], "layers": []}
    ranks = tuple(args["ranks"])
    rE, rH, rI = ranks
    for T in args["tokens"]:
        # (a) collectives at the layouts' sizes
        for what, n in (("all_reduce", rH), ("all_reduce", H), ("all_gather", 2 * rH), ("all_gather", H)):
            if what == "all_reduce":
                buf = torch.randn(T, n)
                fn = lambda buf=buf: ctx.all_reduce(buf)  # noqa: E731
            else:
                sizes = [n // world] * world
                part = torch.randn(T, n // world)
                fn = lambda part=part, sizes=sizes: ctx.all_gather_cat(part, sizes)  # noqa: E731
            results["collectives"].append({"op": what, "values": n, "T": T, "s": _timeit(fn, args["min_time"])})
    gen = torch.Generator().manual_seed(0)
    factors = {}
    for p in ("gate", "up", "down"):
        factors[f"{p}.U_E"] = torch.linalg.qr(torch.randn(E, rE, generator=gen))[0]
        factors[f"{p}.U_H"] = torch.linalg.qr(torch.randn(H, rH, generator=gen))[0]
        factors[f"{p}.U_I"] = torch.linalg.qr(torch.randn(I, rI, generator=gen))[0]
        factors[f"{p}.core"] = torch.randn(rE, rH, rI, generator=gen) * 0.05
    modules = {}
    for layout in LAYOUTS:
        m = TuckerExperts(E, H, I, {p: ranks for p in factors and ("gate", "up", "down")}, layout=layout,
                          parallel=ctx, dtype=torch.float32)
        m.load_factors(factors)
        modules[layout] = m
    dense = DenseExperts(E, H, I, ctx, dtype=torch.float32)
    with torch.no_grad():
        for p in ("gate", "up", "down"):
            getattr(dense, p).normal_(0, 0.02, generator=torch.Generator().manual_seed(rank))
    modules = {"dense": dense, **modules}
    for T in args["tokens"]:
        g = torch.Generator().manual_seed(T)
        x = torch.randn(T, H, generator=g)
        idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
        w = torch.softmax(torch.randn(T, K, generator=g), dim=-1)
        for name, m in modules.items():
            with torch.no_grad():
                s = _timeit(lambda m=m: m(x, idx, w), args["min_time"])
            results["layers"].append({"layout": name, "T": T, "s": s})
    if rank == 0:
        Path(out).write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


def measure(tp: int, ranks, tokens, min_time: float) -> dict:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "r.json")
        args = {"ranks": list(ranks), "tokens": list(tokens), "min_time": min_time}
        mp.start_processes(_worker, args=(tp, f"tcp://127.0.0.1:{_free_port()}", args, out), nprocs=tp,
                           start_method="spawn")
        return json.loads(Path(out).read_text())


def print_measured(res: dict, tp: int) -> None:
    print(f"\ncollectives, gloo, {tp} processes (ms per call; values per token)")
    print("| op | values | T | ms |")
    print("|---|---:|---:|---:|")
    for c in res["collectives"]:
        print(f"| {c['op']} | {c['values']} | {c['T']} | {c['s'] * 1e3:.3f} |")
    print(f"\ntime per MoE layer (experts), tp={tp}, ms; ratio = dense TP / layout (higher is faster)")
    print("| layout | T | ms | vs dense TP |")
    print("|---|---:|---:|---:|")
    base = {r["T"]: r["s"] for r in res["layers"] if r["layout"] == "dense"}
    for r in res["layers"]:
        print(f"| {r['layout']} | {r['T']} | {r['s'] * 1e3:.2f} | {base[r['T']] / r['s']:.2f}x |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--measure", action="store_true", help="also time collectives and layers with gloo processes")
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--ranks", default="64,512,256")
    ap.add_argument("--tokens", default="16,512")
    ap.add_argument("--min-time", type=float, default=1.0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    rows = table()
    print(f"per rank, per token, one MoE layer at E={E}, H={H}, I={I}, top-{K}; sent = values a rank sends "
          "(ring all-reduce of n: 2n(N-1)/N, all-gather of n: n(N-1)/N)")
    print_table(rows)
    result = {"table": rows, "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count()}
    if args.measure:
        ranks = tuple(int(v) for v in args.ranks.split(","))
        res = measure(args.tp, ranks, [int(t) for t in args.tokens.split(",")], args.min_time)
        print_measured(res, args.tp)
        result["measured"] = res
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

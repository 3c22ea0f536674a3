"""Speed and memory of one MoE layer: Tucker experts vs transformers' dense experts vs the first draft.

One layer with Qwen3-30B-A3B shapes (E=128, H=2048, I=768, top-8). For each batch
size the same routing is fed to:

* transformers' ``Qwen3MoeExperts`` with dense weights, in the implementation it uses
  by default (``grouped_mm``, which falls back to eager where it cannot dispatch) and
  in each other available one (eager, batched_mm, grouped_mm);
* ``tuckerize.runtime.TuckerExperts`` at each rank setting;
* the first draft's per-token formulation (shared/seeds/000): the combined core
  ``U_E[e] x core`` formed for every routed pair.

Reports tokens per second, the speed-up over dense (default and fastest), the
multiply-add ratio of DESIGN.md and the memory held per layer.

    python bench/runtime.py                      # CPU, float32
    python bench/runtime.py --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

E, H, I, K = 128, 2048, 768, 8


def macs_dense() -> int:
    return 3 * H * I * K


def macs_tucker(rH: int, rI: int) -> int:
    return 3 * H * rH + K * (3 * rH * rI + 3 * rI * I)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timeit(fn, device, min_time=1.0, min_reps=3, max_reps=50):
    fn()  # warm-up
    sync(device)
    times = []
    start = time.perf_counter()
    while len(times) < min_reps or (time.perf_counter() - start < min_time and len(times) < max_reps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def orthonormal(n, r, gen, dtype, device):
    q, _ = torch.linalg.qr(torch.randn(n, r, generator=gen))
    return q.to(device=device, dtype=dtype)


def make_tucker(ranks, gen, dtype, device):
    from tuckerize.runtime.tucker_experts import TuckerExperts

    rE, rH, rI = ranks
    m = TuckerExperts(E, H, I, {p: ranks for p in ("gate", "up", "down")}, dtype=dtype, device=device)
    tensors = {}
    for p in ("gate", "up", "down"):
        tensors[f"{p}.U_E"] = orthonormal(E, rE, gen, dtype, device)
        tensors[f"{p}.U_H"] = orthonormal(H, rH, gen, dtype, device)
        tensors[f"{p}.U_I"] = orthonormal(I, rI, gen, dtype, device)
        tensors[f"{p}.core"] = (torch.randn(rE, rH, rI, generator=gen) * 0.05).to(device=device, dtype=dtype)
    m.load_factors(tensors)
    return m, tensors


def draft_forward(t, x, idx, w, chunk=256):
    """The first draft's arithmetic, with its bugs fixed but its per-pair core formation kept:
    every routed pair forms U_E[e] x core (r_E r_H r_I multiply-adds) for each projection."""
    T = x.shape[0]
    pairs_t = torch.arange(T, device=x.device).repeat_interleave(idx.shape[1])
    pairs_e = idx.reshape(-1)
    pairs_w = w.reshape(-1)
    out = torch.zeros_like(x)

    def combined(p, e):
        rE, rH, rI = t[f"{p}.core"].shape
        return (t[f"{p}.U_E"][e] @ t[f"{p}.core"].reshape(rE, -1)).reshape(-1, rH, rI)

    for s in range(0, pairs_e.numel(), chunk):
        e, tt, ww = pairs_e[s : s + chunk], pairs_t[s : s + chunk], pairs_w[s : s + chunk]
        xx = x[tt]
        g = torch.bmm((xx @ t["gate.U_H"]).unsqueeze(1), combined("gate", e)).squeeze(1) @ t["gate.U_I"].T
        u = torch.bmm((xx @ t["up.U_H"]).unsqueeze(1), combined("up", e)).squeeze(1) @ t["up.U_I"].T
        a = torch.nn.functional.silu(g) * u
        d = torch.bmm((a @ t["down.U_I"]).unsqueeze(1), combined("down", e).transpose(1, 2)).squeeze(1)
        out.index_add_(0, tt, (d @ t["down.U_H"].T) * ww[:, None].to(x.dtype))
    return out


def make_dense(impl, dtype, device, gen):
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    cfg = Qwen3MoeConfig(hidden_size=H, moe_intermediate_size=I, num_experts=E, num_experts_per_tok=K)
    cfg._experts_implementation = impl
    m = Qwen3MoeExperts(cfg)
    with torch.no_grad():
        m.gate_up_proj.copy_(torch.randn(E, 2 * I, H, generator=gen) * 0.02)
        m.down_proj.copy_(torch.randn(E, H, I, generator=gen) * 0.02)
    return m.to(device=device, dtype=dtype).requires_grad_(False)


def bytes_of(module) -> int:
    return sum(b.numel() * b.element_size() for b in list(module.buffers()) + list(module.parameters()))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--batches", default="1,16,512")
    ap.add_argument("--ranks", default="64,512,256;128,1024,512")
    ap.add_argument("--impls", default="eager,batched_mm,grouped_mm")
    ap.add_argument("--min-time", type=float, default=1.0)
    ap.add_argument("--json", default=None, help="also write results here")
    args = ap.parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    gen = torch.Generator().manual_seed(0)
    batches = [int(b) for b in args.batches.split(",")]
    rank_sets = [tuple(int(x) for x in r.split(",")) for r in args.ranks.split(";")]

    # transformers' default when nothing is requested (PreTrainedModel.get_correct_experts_implementation)
    default_impl = "grouped_mm"

    results = {"device": str(device), "dtype": args.dtype, "torch": torch.__version__, "threads": torch.get_num_threads(),
               "machine": platform.processor() or platform.machine(), "rows": []}
    dense = {}
    for impl in args.impls.split(","):
        try:
            dense[impl] = make_dense(impl, dtype, device, gen)
        except Exception as exc:  # an implementation this torch cannot run
            print(f"skipping dense {impl}: {exc}")
    tuckers = {r: make_tucker(r, gen, dtype, device) for r in rank_sets}
    dense_bytes = bytes_of(next(iter(dense.values())))

    with torch.inference_mode():
        for T in batches:
            x = torch.randn(T, H, generator=gen).to(device=device, dtype=dtype)
            logits = torch.randn(T, E, generator=gen)
            w, idx = torch.topk(torch.softmax(logits, -1), K, dim=-1)
            w = (w / w.sum(-1, keepdim=True)).to(device=device, dtype=dtype)
            idx = idx.to(device)
            row = {"tokens": T, "dense": {}, "tucker": {}, "draft": {}}
            for impl, m in dense.items():
                try:
                    row["dense"][impl] = T / timeit(lambda: m(x, idx, w), device, args.min_time)
                except Exception as exc:
                    print(f"dense {impl} failed at T={T}: {exc}")
            d_default = row["dense"].get(default_impl) or row["dense"].get("eager")
            d_best = max(row["dense"].values())
            for r, (m, tensors) in tuckers.items():
                tps = T / timeit(lambda: m(x, idx, w), device, args.min_time)
                draft = T / timeit(lambda: draft_forward(tensors, x, idx, w), device, args.min_time)
                ratio = macs_dense() / macs_tucker(r[1], r[2])
                row["tucker"][",".join(map(str, r))] = {
                    "tokens_per_s": tps,
                    "speedup_vs_default": tps / d_default,
                    "speedup_vs_fastest": tps / d_best,
                    "mac_ratio": ratio,
                    "fraction_of_mac_ratio_vs_fastest": tps / d_best / ratio,
                    "speedup_vs_draft": tps / draft,
                }
                row["draft"][",".join(map(str, r))] = draft
            results["rows"].append(row)
            print(json.dumps(row, indent=1))

    mem = {"dense_bytes": dense_bytes}
    for r, (m, _) in tuckers.items():
        held = m.memory_bytes()  # factors, formed cores, and the kernel's own copies (packed weights)
        mem[",".join(map(str, r))] = {"held_bytes": held["total"], "materialized_cores_bytes": held["cores"],
                                      "kernel_bytes": held["kernel"], "kernel": m.kernel.describe(),
                                      "fraction_of_dense": held["total"] / dense_bytes}
    results["memory"] = mem
    print(json.dumps(mem, indent=1))

    # Markdown summary
    print("\n| tokens | dense default (tok/s) | dense fastest | ranks | Tucker (tok/s) | vs default | vs fastest | MAC ratio | vs draft |")
    print("|---:|---:|---:|---|---:|---:|---:|---:|---:|")
    for row in results["rows"]:
        d_default = row["dense"].get(default_impl) or row["dense"].get("eager")
        best_impl = max(row["dense"], key=row["dense"].get)
        for r, t in row["tucker"].items():
            print(f"| {row['tokens']} | {d_default:,.0f} | {row['dense'][best_impl]:,.0f} ({best_impl}) | {r} | "
                  f"{t['tokens_per_s']:,.0f} | {t['speedup_vs_default']:.2f}x | {t['speedup_vs_fastest']:.2f}x | "
                  f"{t['mac_ratio']:.2f}x | {t['speedup_vs_draft']:.1f}x |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()

"""GPU checks in one run: the Tucker MoE layer against dense experts, then the Tucker
engine, decompose and eval on the cuda backend.

0. ``layer`` (issue 13): one MoE layer at Qwen3-30B-A3B shapes (E=128, H=2048, I=768,
   top-8), bf16, ranks (64,512,256) and (128,1024,512), at 1, 4, 16, 512, 4096 tokens,
   same routing for every implementation, median time per call:
   Tucker: ``torch`` (the module's own path), ``static`` (static-shape decode path),
   ``triton`` (the Triton kernels), ``graph-static`` / ``graph-triton`` (the same
   captured in a CUDA graph and replayed); dense: transformers' ``Qwen3MoeExperts``
   with ``grouped_mm`` (and ``batched_mm`` at <= 16 tokens), a Triton fused-MoE
   (the repository's grouped gather-matmul kernel on dense weights, fused-MoE style:
   pairs sorted and padded per expert, gate_up kernel, act, down kernel with the
   routing weights), and vLLM's ``fused_experts`` when vLLM is installed.
   The static path gathers one core per pair, so it runs where P cores fit in 2 GB.
1. ST-HOSVD of one (128, 2048, 768) float32 tensor at ranks (64, 512, 256) on the GPU,
   against this GPU's measured matrix-multiply rate (the arithmetic floor).
2. ``decompose_checkpoint(..., device="cuda")`` of the embedded demo model, compared
   with the CPU result (factors must agree up to float error).
3. ``evaluate(..., backend="cuda")`` of the demo's Tucker model: perplexities, KL, and
   tokens per second of the Tucker model against the dense original in the same run.

    python bench/gpu.py --out /tmp/gpu                      # everything (a few minutes)
    python bench/gpu.py --sections layer --json /tmp/gpu/layer.json
    python bench/gpu.py --dry-run                           # tiny shapes on the CPU (Triton interpreted)
    python bench/gpu.py --sections layer --device cpu --dtype float32 --tokens 1,4,16   # CPU numbers
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

if "--dry-run" in sys.argv and "TRITON_INTERPRET" not in os.environ:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: kernels run on the CPU

import torch

QWEN3_30B = dict(E=128, H=2048, I=768, K=8)
TINY = dict(E=8, H=64, I=48, K=2)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


#: timing (the dry run sets one call, no warm-up: it checks that things run)
TIMING = {"warmup": 2, "min_rounds": 5, "min_time": 0.2, "max_rounds": 200}


def time_round_robin(fns: dict, device) -> tuple[dict, dict]:
    """Median milliseconds per call of each function, called in turn (one round calls
    each once), so that a change of machine load hits every candidate alike; and each
    one's last output."""
    for _ in range(TIMING["warmup"]):
        for fn in fns.values():
            fn()
    sync(device)
    times = {k: [] for k in fns}
    outs = {}
    start = time.perf_counter()
    rounds = 0
    while rounds < TIMING["min_rounds"] or (time.perf_counter() - start < TIMING["min_time"] * len(fns)
                                             and rounds < TIMING["max_rounds"]):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            outs[k] = fn()
            sync(device)
            times[k].append(time.perf_counter() - t0)
        rounds += 1
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}, outs


def cuda_graph(fn):
    """Capture ``fn()`` in a CUDA graph (after warm-up on a side stream); returns replay."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fn()
    return g, out


def rel_err(ref, got) -> float:
    return float((ref.double() - got.double()).norm() / ref.double().norm().clamp_min(1e-30))


def make_tucker(shape, ranks, gen, dtype, device):
    from tuckerize.runtime.tucker_experts import TuckerExperts

    E, H, I = shape["E"], shape["H"], shape["I"]
    rE, rH, rI = ranks
    m = TuckerExperts(E, H, I, {p: ranks for p in ("gate", "up", "down")}, dtype=dtype, device=device)
    t = {}
    for p in ("gate", "up", "down"):
        for f, (n, r) in {"U_E": (E, rE), "U_H": (H, rH), "U_I": (I, rI)}.items():
            t[f"{p}.{f}"] = torch.linalg.qr(torch.randn(n, r, generator=gen))[0].to(device=device, dtype=dtype)
        t[f"{p}.core"] = (torch.randn(rE, rH, rI, generator=gen) * 0.05).to(device=device, dtype=dtype)
    m.load_factors(t)
    return m


def make_dense(shape, impl, gen, dtype, device):
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    E, H, I, K = shape["E"], shape["H"], shape["I"], shape["K"]
    cfg = Qwen3MoeConfig(hidden_size=H, moe_intermediate_size=I, num_experts=E, num_experts_per_tok=K)
    cfg._experts_implementation = impl
    m = Qwen3MoeExperts(cfg)
    with torch.no_grad():
        m.gate_up_proj.copy_(torch.randn(E, 2 * I, H, generator=gen) * 0.02)
        m.down_proj.copy_(torch.randn(E, H, I, generator=gen) * 0.02)
    return m.to(device=device, dtype=dtype).requires_grad_(False)


def triton_dense_moe(dense, x, idx, w):
    """Dense fused-MoE in Triton: pairs sorted and padded per expert (``PairBlocks``),
    one grouped gather-matmul for gate_up, the activation, one for down with the routing
    weights and the reduction over a token's experts (the kernels of triton_moe)."""
    from tuckerize.runtime.kernels.triton_moe import PairBlocks

    T, K = idx.shape
    gu, dn = dense.gate_up_proj, dense.down_proj  # [E, 2I, H], [E, H, I]
    I = gu.shape[1] // 2
    blocks = PairBlocks(idx.reshape(-1), gu.shape[0], K, x.dtype)
    h = blocks.matmul(x, gu, torch.empty(T * K, 2 * I, dtype=x.dtype, device=x.device), transposed=True)
    a = (torch.nn.functional.silu(h[:, :I]) * h[:, I:]).contiguous()
    out = torch.zeros(T, gu.shape[2], dtype=torch.float32, device=x.device)
    blocks.matmul(a, dn, out, transposed=True, scatter_weights=w.reshape(-1).contiguous())
    return out.to(x.dtype)


def vllm_fused(dense):
    """vLLM's fused_experts on the same weights, or None when vLLM is not installed."""
    try:
        from vllm.model_executor.layers.fused_moe import fused_experts
    except Exception:
        return None
    w1, w2 = dense.gate_up_proj, dense.down_proj  # vLLM: w1 [E, 2I, H], w2 [E, H, I]
    return lambda x, idx, w: fused_experts(x, w1, w2, w.float(), idx.to(torch.int32))


def layer_bench(args, device, dtype) -> dict:
    from tuckerize.runtime.kernels import DecodeDispatch, triton_available

    shape = TINY if args.dry_run else QWEN3_30B
    E, H, I, K = shape["E"], shape["H"], shape["I"], shape["K"]
    tokens = [int(t) for t in args.tokens.split(",")]
    rank_sets = [tuple(int(v) for v in r.split(",")) for r in args.ranks.split(";")]
    gen = torch.Generator().manual_seed(0)
    has_triton = triton_available() and (device.type == "cuda" or args.dry_run)
    res = {"shape": shape, "dtype": str(dtype), "device": str(device), "triton": has_triton, "rows": []}
    dense = make_dense(shape, "grouped_mm", gen, dtype, device)

    def dense_impl(impl):
        def fn(x, idx, w):
            dense.config._experts_implementation = impl  # read by transformers at each call
            return dense(x, idx, w)
        return fn

    vllm = vllm_fused(dense) if device.type == "cuda" else None
    tuckers = {r: make_tucker(shape, r, gen, dtype, device) for r in rank_sets}
    elt = torch.tensor([], dtype=dtype).element_size()
    impls = {"torch": None, "static": DecodeDispatch("static", max_tokens=1 << 30, devices=(device.type,))}
    if has_triton:
        impls["triton"] = DecodeDispatch("triton", max_tokens=1 << 30, devices=(device.type,))

    def tucker_call(m, impl, x, idx, w):
        def fn():
            m.decode_impl = impl
            return m(x, idx, w)
        return fn

    with torch.inference_mode():
        for T in tokens:
            x = torch.randn(T, H, generator=gen).to(device=device, dtype=dtype)
            w, idx = torch.topk(torch.softmax(torch.randn(T, E, generator=gen), -1), K, dim=-1)
            w = (w / w.sum(-1, keepdim=True)).to(device=device, dtype=dtype)
            idx = idx.to(device)
            fns = {"dense/grouped_mm": lambda: dense_impl("grouped_mm")(x, idx, w)}
            if T <= 16 and "batched_mm" in args.dense:
                fns["dense/batched_mm"] = lambda: dense_impl("batched_mm")(x, idx, w)
            if has_triton and "triton" in args.dense:
                fns["dense/triton_fused_moe"] = lambda: triton_dense_moe(dense, x, idx, w)
            if vllm is not None:
                fns["dense/vllm_fused_experts"] = lambda: vllm(x, idx, w)
            graphs = []
            for r, m in tuckers.items():
                key = ",".join(map(str, r))
                for name, impl in impls.items():
                    if name == "static" and T * K * r[1] * r[2] * elt > 2 << 30:
                        continue  # the per-pair core gather would not fit: not a decode size
                    fns[f"{key}/{name}"] = tucker_call(m, impl, x, idx, w)
                    if device.type == "cuda" and name != "torch":
                        g, out = cuda_graph(tucker_call(m, impl, x, idx, w))
                        graphs.append(g)
                        fns[f"{key}/graph-{name}"] = lambda g=g, out=out: (g.replay(), out)[1]
            ms, outs = time_round_robin(fns, device)
            del graphs
            for m in tuckers.values():
                m.decode_impl = None
            row = {"tokens": T, "dense_ms": {}, "tucker": {}}
            for k, v in ms.items():
                if k.startswith("dense/"):
                    row["dense_ms"][k[6:]] = v
                    if k != "dense/grouped_mm":
                        row[f"dense_{k[6:]}_rel_err"] = rel_err(outs["dense/grouped_mm"], outs[k])
            best_dense = min(row["dense_ms"], key=row["dense_ms"].get)
            for r in tuckers:
                key = ",".join(map(str, r))
                cell = {}
                for k, v in ms.items():
                    if k.startswith(key + "/"):
                        name = k[len(key) + 1:]
                        cell[f"{name}_ms"] = v
                        if name != "torch":
                            cell[f"{name}_vs_torch_rel_err"] = rel_err(outs[f"{key}/torch"], outs[k])
                best = min((k for k in cell if k.endswith("_ms")), key=cell.get)
                mac = 3 * H * I * K / (3 * H * r[1] + K * (3 * r[1] * r[2] + 3 * r[2] * I))
                cell.update(best=best[:-3], best_ms=cell[best], mac_ratio=mac, fastest_dense=best_dense,
                            speedup_vs_fastest_dense=row["dense_ms"][best_dense] / cell[best])
                if "static_ms" in cell:
                    cell["static_speedup_vs_torch"] = cell["torch_ms"] / cell["static_ms"]
                cell["fraction_of_mac_ratio"] = cell["speedup_vs_fastest_dense"] / mac
                row["tucker"][key] = cell
            res["rows"].append(row)
            print(json.dumps(row), flush=True)
    return res


def layer_table(res) -> str:
    """Markdown: per tokens and ranks, every path's ms, and the best Tucker path against
    the fastest dense (target: >= 2x at 1-16 tokens, >= 70% of the MAC ratio at 512-4096)."""
    cols = ["torch", "static", "triton", "graph-static", "graph-triton"]
    lines = ["| tokens | dense grouped_mm (ms) | fastest dense (ms) | ranks | "
             + " | ".join(f"Tucker {c} (ms)" for c in cols) + " | best vs fastest dense | MAC ratio | of MAC ratio |",
             "|---:|---:|---|---|" + "---:|" * len(cols) + "---:|---:|---:|"]
    for row in res["rows"]:
        d = row["dense_ms"]
        fd = min(d, key=d.get)
        for r, c in row["tucker"].items():
            ms = " | ".join(f"{c[k + '_ms']:.3f}" if k + "_ms" in c else "n/a" for k in cols)
            lines.append(f"| {row['tokens']} | {d['grouped_mm']:.3f} | {d[fd]:.3f} ({fd}) | {r} | {ms} | "
                         f"{c['speedup_vs_fastest_dense']:.2f}x ({c['best']}) | {c['mac_ratio']:.2f}x | "
                         f"{c['fraction_of_mac_ratio']:.0%} |")
    return "\n".join(lines)


def engine_bench(dev) -> dict:
    from tuckerize.decompose import cheapest_mode_order, sthosvd_flops, tucker

    n = 8192
    a, b = torch.randn(n, n, device=dev), torch.randn(n, n, device=dev)
    a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(5):
        a @ b
    torch.cuda.synchronize()
    rate = 5 * 2 * n**3 / (time.perf_counter() - t)
    del a, b
    shape, ranks = (128, 2048, 768), (64, 512, 256)
    flops = sthosvd_flops(shape, ranks, cheapest_mode_order(shape, ranks))
    W = torch.randn(*shape, device=dev)
    tucker(W, ranks)
    torch.cuda.synchronize()
    times = []
    for _ in range(3):
        t = time.perf_counter()
        r = tucker(W, ranks)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return {"sgemm_tflops_fp32": rate / 1e12, "seconds": min(times), "floor_s": flops / rate,
            "floor_ratio": min(times) / (flops / rate), "error": r.relative_error}


def decompose_bench(out: Path, ranks: str) -> dict:
    from tuckerize.compress import decompose_checkpoint

    t = time.perf_counter()
    m_gpu = decompose_checkpoint("tuckerize/demo/model", out / "demo-gpu", ranks=ranks, device="cuda", overwrite=True)
    elapsed = time.perf_counter() - t
    m_cpu = decompose_checkpoint("tuckerize/demo/model", out / "demo-cpu", ranks=ranks, device="cpu", overwrite=True)
    diffs = [abs(a["relative_error"] - b["relative_error"]) for a, b in zip(m_gpu["tensors"], m_cpu["tensors"])]
    return {"decompose_cuda_s": elapsed, "decompose_cpu_vs_cuda_max_error_diff": max(diffs)}


def eval_bench(out: Path, seqlen: int) -> dict:
    from tuckerize.evaluate import evaluate

    res = {}
    for dtype in ("float32", "bfloat16"):
        rep = evaluate(str(out / "demo-gpu"), "tuckerize/demo/model", text="demo", seqlen=seqlen,
                       backend="cuda", dtype=dtype, use_cache=False)
        res[f"eval_{dtype}"] = {
            "baseline_ppl": rep["baseline_result"]["perplexity"], "tucker_ppl": rep["tucker_result"]["perplexity"],
            "kl": rep["fidelity"]["kl_mean"], "top1": rep["fidelity"]["top1_agreement"],
            "dense_tokens_per_s": rep["baseline_result"]["tokens_per_s"],
            "tucker_tokens_per_s": rep["tucker_result"]["tokens_per_s"],
            "speedup": rep["tucker_result"]["tokens_per_s"] / rep["baseline_result"]["tokens_per_s"],
        }
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="/tmp/tuckerize-gpu")
    ap.add_argument("--sections", default="layer,engine,decompose,eval")
    ap.add_argument("--tokens", default=None, help="layer: token counts (default 1,4,16,512,4096; dry run 1,4)")
    ap.add_argument("--ranks", default=None, help="layer: rank sets (default '64,512,256;128,1024,512')")
    ap.add_argument("--demo-ranks", default="8,64,32", help="decompose/eval: the demo model's ranks")
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--json", default=None, help="results file (default OUT/gpu.json)")
    ap.add_argument("--device", default="cuda", help="cpu: the layer section at full shapes on the CPU (no Triton)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    ap.add_argument("--dense", default="grouped_mm,batched_mm,triton,vllm",
                    help="layer: dense baselines (grouped_mm always; batched_mm at <= 16 tokens)")
    ap.add_argument("--min-rounds", type=int, default=None, help="layer: rounds of timing at least (default 5)")
    ap.add_argument("--dry-run", action="store_true",
                    help="the layer section only, on tiny shapes on the CPU in float32 (Triton interpreted)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.dry_run:
        dev, dtype, sections = torch.device("cpu"), torch.float32, ["layer"]
        TIMING.update(warmup=0, min_rounds=1, min_time=0.0, max_rounds=1)
        args.tokens = args.tokens or "1,4"
        args.ranks = args.ranks or "4,16,8;8,32,16"
    else:
        if args.device == "cuda" and not torch.cuda.is_available():
            sys.exit("bench/gpu.py needs a CUDA GPU (or --device cpu, or --dry-run for a CPU check on tiny shapes)")
        dev, dtype, sections = torch.device(args.device), getattr(torch, args.dtype), args.sections.split(",")
        if dev.type != "cuda":
            sections = [s for s in sections if s == "layer"]
        args.tokens = args.tokens or "1,4,16,512,4096"
        args.ranks = args.ranks or "64,512,256;128,1024,512"
    if args.min_rounds:
        TIMING["min_rounds"] = args.min_rounds
    res = {"dry_run": args.dry_run, "threads": torch.get_num_threads(), "torch": torch.__version__,
           "gpu": torch.cuda.get_device_name(0) if dev.type == "cuda" else None}
    if "layer" in sections:
        res["layer"] = layer_bench(args, dev, dtype)
    if "engine" in sections:
        res["engine"] = engine_bench(dev)
        print(json.dumps(res["engine"]), flush=True)
    if "decompose" in sections:
        res.update(decompose_bench(out, args.demo_ranks))
        print("decompose cuda vs cpu: max |error difference|", res["decompose_cpu_vs_cuda_max_error_diff"], flush=True)
    if "eval" in sections:
        if "decompose" not in sections and not (out / "demo-gpu").exists():
            res.update(decompose_bench(out, args.demo_ranks))
        res.update(eval_bench(out, args.seqlen))
        for k in ("eval_float32", "eval_bfloat16"):
            print(k, json.dumps(res[k]), flush=True)
    path = Path(args.json) if args.json else out / "gpu.json"
    path.write_text(json.dumps(res, indent=1))
    if "layer" in res:
        print()
        print(layer_table(res["layer"]))


if __name__ == "__main__":
    main()

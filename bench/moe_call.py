"""One MoE block call at decoding sizes, with the caches as a served step leaves them (CPU).

Inside vLLM the plugin's MoE block takes about 0.4 ms per call at batch 1 even at ranks
(8,16,16), whose experts read almost nothing (BENCHMARKS.md, "Serving with vLLM (CPU)"). This
bench asks where that fixed cost comes from: the number of operations a call runs, or the
state the rest of the step leaves the machine in. One layer with Qwen3-30B-A3B shapes (E=128,
H=2048, I=768, top-8), the block as the plugin runs it (router, then the experts:
:func:`tuckerize.runtime.moe.routed_experts`), timed per call in three states:

* ``hot``: calls back to back (weights, code and OpenMP threads warm: what a micro-benchmark sees);
* ``idle``: a 2 ms sleep before each call (OpenMP's threads have gone to sleep);
* ``cold``: a 256 MiB buffer written before each call (the caches hold someone else's data, as
  after a step's attention and the other layers).

Rows: Tucker experts at each ``--ranks`` (the kernel chosen at load: ``bags`` on the CPU) and,
as the baseline of the same run, dense experts behind the same router: transformers'
``Qwen3MoeExperts`` in each ``--dense`` implementation (``eager``: a product per expert with
rows; ``grouped_mm``), and ``onednn``, the same products through oneDNN with each expert's
weights reordered at load (:class:`DenseOneDNN`), as vLLM's CPU MoE reads them: torch's plain
``mm`` reads a one-row product's weights at about a third of the bandwidth oneDNN's packed
layout gets on this CPU. Reports the median ms per call, each Tucker row against the fastest
dense row in the same state (which can only lower the ratio), and each row's cold time over
its hot time.

    python bench/moe_call.py                          # float32
    python bench/moe_call.py --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from runtime import E, H, I, K, make_dense, make_tucker
from tuckerize.runtime.kernels.cpu_moe import onednn_dtype, pack
from tuckerize.runtime.moe import routed_experts
from tuckerize.runtime.routing import RouterSpec

STATES = ("hot", "idle", "cold")


class DenseOneDNN(torch.nn.Module):
    """Dense experts as vLLM's CPU MoE runs them: per expert with rows, ``x W_gu^T`` and ``a W_d^T``
    through oneDNN, each weight reordered once at load (:func:`~tuckerize.runtime.kernels.cpu_moe.pack`).
    Built from transformers' ``Qwen3MoeExperts`` (its ``gate_up_proj`` [E, 2I, H], ``down_proj`` [E, H, I])."""

    def __init__(self, dense: torch.nn.Module):
        super().__init__()
        self.gate_up = [pack(w) for w in dense.gate_up_proj.detach()]
        self.down = [pack(w) for w in dense.down_proj.detach()]

    @staticmethod
    def _linear(x, w):
        return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")

    def forward(self, x, top_k_index, top_k_weights):
        out = torch.zeros_like(x)
        for e in top_k_index.unique().tolist():  # the host knows the experts: a dense baseline, not ours
            tok, k = (top_k_index == e).nonzero(as_tuple=True)
            h = self._linear(x[tok], self.gate_up[e])
            a = F.silu(h[:, :I]) * h[:, I:]
            out.index_add_(0, tok, self._linear(a, self.down[e]) * top_k_weights[tok, k, None].to(x.dtype))
        return out


def per_call(fn, state: str, calls: int, flush: torch.Tensor) -> float:
    """Median seconds of ``fn()`` over ``calls`` calls, each preceded by what ``state`` names."""
    times = []
    for _ in range(calls):
        if state == "idle":
            time.sleep(0.002)
        elif state == "cold":
            flush.add_(1.0)
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--tokens", default="1,8")
    ap.add_argument("--ranks", default="64,512,256;8,16,16")
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--dense", default="eager,grouped_mm", help="transformers' expert implementations of the baseline")
    ap.add_argument("--json", default=None, help="also write results here")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    gen = torch.Generator().manual_seed(0)
    spec = RouterSpec("softmax_topk", E, K, norm_topk_prob=True)
    router = (torch.randn(E, H, generator=gen) * 0.02).to(dtype)
    models = {f"dense {impl}": make_dense(impl, dtype, "cpu", gen) for impl in args.dense.split(",")}
    if onednn_dtype(dtype):
        models["dense onednn"] = DenseOneDNN(next(iter(models.values())))
    for r in args.ranks.split(";"):
        models[f"tucker {r}"] = make_tucker(tuple(int(v) for v in r.split(",")), gen, dtype, "cpu")[0]
    flush = torch.zeros(64 * 2**20)  # 256 MiB
    rows = []
    with torch.inference_mode():
        for T in (int(t) for t in args.tokens.split(",")):
            x = torch.randn(T, H, generator=gen).to(dtype)
            for name, m in models.items():
                def call(m=m):
                    return routed_experts(x, router, spec, m)

                for _ in range(20):
                    call()
                rows.append({"tokens": T, "model": name,
                             **{s: 1e3 * per_call(call, s, args.calls, flush) for s in STATES}})
    kernels = {n: m.kernel.describe() for n, m in models.items() if hasattr(m, "kernel")}
    report = {"machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
              "torch": torch.__version__, "dtype": args.dtype, "kernels": kernels, "rows": rows}
    print("| tokens | model | " + " | ".join(f"{s} ms (fastest dense / this)" for s in STATES) + " | cold / hot |")
    print("|---|---|" + "---|" * (len(STATES) + 1))
    for row in rows:
        dense = [r for r in rows if r["tokens"] == row["tokens"] and r["model"].startswith("dense")]
        cells = [f"{row[s]:.3f} ({min(d[s] for d in dense) / row[s]:.2f}x)" for s in STATES]
        print(f"| {row['tokens']} | {row['model']} | " + " | ".join(cells) + f" | {row['cold'] / row['hot']:.2f}x |")
    print(json.dumps(kernels))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()

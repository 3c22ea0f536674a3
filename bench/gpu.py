"""GPU checks in one run: the Tucker engine, decompose and eval on the cuda backend.

1. ST-HOSVD of one (128, 2048, 768) float32 tensor at ranks (64, 512, 256) on the GPU,
   against this GPU's measured matrix-multiply rate (the arithmetic floor).
2. ``decompose_checkpoint(..., device="cuda")`` of the embedded demo model, compared
   with the CPU result (factors must agree up to float error).
3. ``evaluate(..., backend="cuda")`` of the demo's Tucker model: perplexities, KL, and
   tokens per second of the Tucker model against the dense original in the same run.

    python bench/gpu.py --out /tmp/gpu
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="/tmp/tuckerize-gpu")
    ap.add_argument("--ranks", default="8,64,32")
    ap.add_argument("--seqlen", type=int, default=256)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.device("cuda")
    res = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__}

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
    res["engine"] = {"sgemm_tflops_fp32": rate / 1e12, "seconds": min(times), "floor_s": flops / rate,
                     "floor_ratio": min(times) / (flops / rate), "error": r.relative_error}
    print(json.dumps(res["engine"]))
    del W

    from tuckerize.compress import decompose_checkpoint

    t = time.perf_counter()
    m_gpu = decompose_checkpoint("tuckerize/demo/model", out / "demo-gpu", ranks=args.ranks, device="cuda", overwrite=True)
    res["decompose_cuda_s"] = time.perf_counter() - t
    m_cpu = decompose_checkpoint("tuckerize/demo/model", out / "demo-cpu", ranks=args.ranks, device="cpu", overwrite=True)
    diffs = [abs(a["relative_error"] - b["relative_error"]) for a, b in zip(m_gpu["tensors"], m_cpu["tensors"])]
    res["decompose_cpu_vs_cuda_max_error_diff"] = max(diffs)
    print("decompose cuda vs cpu: max |error difference|", max(diffs))

    from tuckerize.evaluate import evaluate

    for dtype in ("float32", "bfloat16"):
        rep = evaluate(str(out / "demo-gpu"), "tuckerize/demo/model", text="demo", seqlen=args.seqlen,
                       backend="cuda", dtype=dtype, use_cache=False)
        res[f"eval_{dtype}"] = {
            "baseline_ppl": rep["baseline_result"]["perplexity"], "tucker_ppl": rep["tucker_result"]["perplexity"],
            "kl": rep["fidelity"]["kl_mean"], "top1": rep["fidelity"]["top1_agreement"],
            "dense_tokens_per_s": rep["baseline_result"]["tokens_per_s"],
            "tucker_tokens_per_s": rep["tucker_result"]["tokens_per_s"],
            "speedup": rep["tucker_result"]["tokens_per_s"] / rep["baseline_result"]["tokens_per_s"],
        }
        print(dtype, json.dumps(res[f"eval_{dtype}"]))
    (out / "gpu.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()

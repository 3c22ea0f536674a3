"""Tucker engine vs TensorLy on one expert tensor with Qwen3-30B-A3B's shape.

One (128, 2048, 768) float32 tensor at ranks (64, 512, 256), in one run:

* this machine's matrix-multiply rate (sgemm, 4096^3), hence the arithmetic floor of
  ST-HOSVD (``sthosvd_flops`` of the cheapest mode order, about 455 GFLOP);
* tuckerize's engine: ST-HOSVD, and ST-HOSVD + 1 and 2 HOOI sweeps;
* ``tensorly.decomposition.tucker`` with its defaults (SVD initialisation, up to 100
  HOOI iterations, tol 1e-4) bounded to ``--tl-iters`` iterations so that it finishes,
  timed per phase (initialisation, then each iteration) so that the default run's
  time is extrapolated from measured numbers.

The tensor has the spectrum of a trained weight: a Tucker-structured part with
decaying singular values plus a noise floor (a Gaussian tensor has a flat spectrum
on which every method is equally bad).

    python bench/decompose.py                 # about 10 minutes on 2 cores
    python bench/decompose.py --quick         # smaller tensor, for a smoke test
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch


def sgemm_rate(n: int = 4096, reps: int = 3) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def structured_tensor(shape, gen):
    """Decaying multilinear spectrum + 10% noise, normalised to unit Frobenius norm."""
    from tuckerize.decompose import mode_dot

    E, H, I = shape
    r = (min(E, 96), min(H, 768), min(I, 384))
    core = torch.randn(*r, generator=gen)
    for mode, n in enumerate(r):
        decay = torch.exp(-torch.arange(n, dtype=torch.float32) / (n / 4))
        core = core * decay.reshape([-1 if m == mode else 1 for m in range(3)])
    t = core
    for mode, (d, n) in enumerate(zip(shape, r)):
        q, _ = torch.linalg.qr(torch.randn(d, n, generator=gen))
        t = mode_dot(t, q, mode)
    t = t / t.norm()
    noise = torch.randn(*shape, generator=gen)
    t = t + 0.1 * noise / noise.norm()
    return t / t.norm()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="128,2048,768")
    ap.add_argument("--ranks", default="64,512,256")
    ap.add_argument("--tl-iters", type=int, default=1, help="HOOI iterations TensorLy may run (its default is 100)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.quick:
        args.shape, args.ranks = "32,512,192", "16,128,64"
    shape = tuple(int(x) for x in args.shape.split(","))
    ranks = tuple(int(x) for x in args.ranks.split(","))
    gen = torch.Generator().manual_seed(0)

    from tuckerize.decompose import cheapest_mode_order, sthosvd_flops, tucker
    from tuckerize.decompose.tucker import hooi_sweep_flops, squared_norm

    rate = sgemm_rate()
    order = cheapest_mode_order(shape, ranks)
    flops = sthosvd_flops(shape, ranks, order)
    floor = flops / rate
    W = structured_tensor(shape, gen)
    res = {"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
           "torch": torch.__version__, "shape": shape, "ranks": ranks, "sgemm_gflops": rate / 1e9,
           "sthosvd_gflop": flops / 1e9, "hooi_sweep_gflop": hooi_sweep_flops(shape, ranks) / 1e9,
           "floor_s": floor, "mode_order": order, "ours": {}}
    print(f"sgemm {rate / 1e9:.1f} GFLOP/s; ST-HOSVD {flops / 1e9:.0f} GFLOP -> floor {floor:.2f} s")

    for iters in (0, 1, 2):
        best = float("inf")
        for _ in range(2 if iters == 0 else 1):
            t = time.perf_counter()
            out = tucker(W, ranks, n_iter_max=iters, tol=0.0)
            best = min(best, time.perf_counter() - t)
        res["ours"][iters] = {"seconds": best, "error": out.relative_error}
        print(f"tuckerize iters={iters}: {best:.2f} s, error {out.relative_error:.6f}")
    # The floor uses the best matrix-multiply rate seen before or after (conservative when the
    # machine is shared: a slow sgemm sample would flatter the ratio).
    rate = max(rate, sgemm_rate())
    floor = flops / rate
    res["sgemm_gflops"], res["floor_s"] = rate / 1e9, floor
    for iters, r in res["ours"].items():
        r["floor_ratio"] = r["seconds"] / floor
        print(f"iters={iters}: {r['floor_ratio']:.2f}x the floor ({floor:.2f} s at {rate / 1e9:.0f} GFLOP/s)")

    import tensorly as tl
    from tensorly.decomposition import tucker as tl_tucker

    tl.set_backend("pytorch")
    t0 = time.perf_counter()
    core, factors = tl_tucker(W, rank=list(ranks), n_iter_max=args.tl_iters, tol=1e-4, random_state=0)
    t1 = time.perf_counter()
    rec = tl.tucker_to_tensor((core, factors))
    rec -= W
    # float64 accumulation: a float32 norm over 2e8 entries is off by ~0.5% here
    tl_err = (squared_norm(rec) / squared_norm(W)) ** 0.5
    del rec
    # TensorLy does one SVD-based initialisation then n_iter_max HOOI iterations. Time the
    # initialisation alone (n_iter_max=0 is not accepted; 1 iteration = init + 1 sweep).
    t2 = time.perf_counter()
    from tensorly.decomposition._tucker import initialize_tucker

    initialize_tucker(W, list(ranks), list(range(3)), init="svd", svd="truncated_svd", random_state=0)
    init_s = time.perf_counter() - t2
    per_iter = max((t1 - t0 - init_s) / args.tl_iters, 0.0)
    res["tensorly"] = {"n_iter_max": args.tl_iters, "seconds": t1 - t0, "error": tl_err,
                       "init_seconds": init_s, "seconds_per_iteration": per_iter}
    ours = res["ours"][0]
    # Lower bound on TensorLy's defaults: initialisation + 2 iterations (it stops at the earliest
    # when the error change drops below tol, which needs at least 2 iterations to measure).
    default_lb = init_s + 2 * per_iter
    res["speedup_vs_tensorly_bounded"] = (t1 - t0) / ours["seconds"]
    res["speedup_vs_tensorly_defaults_lower_bound"] = default_lb / ours["seconds"]
    print(f"tensorly n_iter_max={args.tl_iters}: {t1 - t0:.1f} s (init {init_s:.1f} s, {per_iter:.1f} s/iter), "
          f"error {tl_err:.6f}")
    print(f"speed-up: {res['speedup_vs_tensorly_bounded']:.1f}x vs tensorly (bounded run), "
          f">= {res['speedup_vs_tensorly_defaults_lower_bound']:.1f}x vs tensorly defaults; "
          f"error ours {ours['error']:.6f} vs tensorly {tl_err:.6f} "
          f"(difference {ours['error'] - tl_err:+.2e})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()

"""Serving speed and weight memory under vLLM (CPU build): dense experts vs the Tucker plugin.

A synthetic Qwen3-MoE with Qwen3-30B-A3B expert shapes (E=128, H=2048, I=768, top-8;
attention 32 heads / 4 KV heads of 128) but ``--layers`` decoder layers and a small
vocabulary, written three times with the same non-expert tensors: dense experts, and Tucker
factors at each ``--ranks`` (random orthonormal factors: speed and memory depend on the
shapes only). Each model is served by vLLM in its own process (``--dtype``: float32 or
bfloat16; eager; one rank, or ``--tp N`` ranks, where each Tucker checkpoint is served once
per ``--layouts`` entry through ``TUCKERIZE_LAYOUT``, against dense experts under vLLM's own
tensor parallelism; with ``--kernels``, once per kernel through ``TUCKERIZE_KERNEL``) and
measured in one run:

* prefill tokens/s: ``--prefill-prompts`` prompts of ``--prefill-len`` tokens, one new token;
* decode tokens/s at batch 1, 8 and 32: prompts of 16 tokens, ``--decode-tokens`` new tokens
  each (ignore EOS); the decode steps only (tokens after each request's first, over the time from
  the first token to the last: :func:`decode_rate`), and, kept beside it (``_wall``), all
  generated tokens over the call's wall time, the prompts' prefill included;
* each rate is the median of three runs, interleaved (every run is kept in the JSON: ``runs``);
* the MoE block's own time: every call of each layer's MoE block (router and experts: vLLM's
  fused MoE for dense, the plugin's op for Tucker) is timed in the engine
  (:func:`tuckerize.integrations.vllm.probes.install_moe_timers`),
  and the median call with exactly b tokens is the decode step's MoE time at batch b: what the
  experts cost inside the step, against what the whole step costs;
* the kernel each Tucker model's experts chose at load
  (:func:`tuckerize.integrations.vllm.probes.kernels_used`);
* weight memory: bytes of every parameter and buffer of the loaded model (the Tucker
  model's include the per-expert cores formed at load), and the checkpoint size on disk;
* the bytes bound: weight bytes one decode step reads, dense over Tucker (attention and the LM
  head included: :func:`step_bytes`), what a memory-bound decode's speed-up cannot exceed;
* a warm-up (``--warm-up`` seconds of CPU and memory work, :func:`warm_up`) before the first
  model, so that no model is measured in the slow spell that follows an idle machine, and the
  dense baseline run twice, first and last, its faster run taken (:func:`faster_baseline`);
* how busy the machine was during each model's run: load average before and after, and the
  cores other processes kept busy (from /proc/stat): compare ratios only within a quiet run;
  ``--busy N`` runs every model with N other processes each spinning on a core (:func:`busy_cores`),
  the bench under contention, as on a shared host.

The default rank sets end with (8,16,16), the floor: Tucker experts that read almost no bytes,
so that row's speed is what attention, the LM head, sampling and vLLM's own work per step allow
any MoE layer; the other rows' speed-ups cannot exceed it, nor their bytes bounds.

vLLM's memory is sized here: its KV cache is given explicitly (:func:`kv_cache_bytes`, a few
hundred MiB), so its CPU start-up check on free memory (which refuses while page cache is
held) does not apply; ``VLLM_CPU_KVCACHE_SPACE`` is not needed.

    python bench/serve.py                       # writes bench/results/serve.json, prints a table
    python bench/serve.py --dtype bfloat16 --out bench/results/serve_bf16_run1.json
    python bench/serve.py --tp 2 --ranks 64,512,256 --out bench/results/serve_tp2.json
    python bench/serve.py --ranks "64,512,256;128,1024,512" --kernels bags,grouped --out bench/results/serve_kernels.json
    python bench/serve.py --busy 1 --ranks 64,512,256 --kernels bags,grouped --out bench/results/serve_one_core_busy.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

E, H, I, K = 128, 2048, 768, 8
HEADS, KV_HEADS, HEAD_DIM = 32, 4, 128


def config(layers: int, vocab: int) -> dict:
    return {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": H,
            "num_hidden_layers": layers, "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS,
            "head_dim": HEAD_DIM, "num_experts": E, "num_experts_per_tok": K, "moe_intermediate_size": I,
            "intermediate_size": 4 * I, "decoder_sparse_step": 1, "mlp_only_layers": [], "norm_topk_prob": True,
            "hidden_act": "silu", "rms_norm_eps": 1e-6, "vocab_size": vocab, "max_position_embeddings": 4096,
            "rope_parameters": {"rope_theta": 1000000.0, "rope_type": "default"}, "tie_word_embeddings": False,
            "attention_bias": False, "dtype": "float32", "bos_token_id": 0, "eos_token_id": 1}


def build(root: Path, layers: int, vocab: int, ranks: list[tuple[int, int, int]]) -> dict[str, Path]:
    """The dense model and one Tucker checkpoint per rank triple, under ``root``."""
    import torch
    from safetensors.torch import save_file

    from tuckerize.format import factor_name, tucker_config

    g = torch.Generator().manual_seed(0)
    std = 0.02

    def rnd(*shape):
        return torch.randn(*shape, generator=g) * std

    base: dict[str, torch.Tensor] = {"model.embed_tokens.weight": rnd(vocab, H), "lm_head.weight": rnd(vocab, H),
                                     "model.norm.weight": torch.ones(H)}
    for n in range(layers):
        p = f"model.layers.{n}"
        base.update({f"{p}.self_attn.q_proj.weight": rnd(HEADS * HEAD_DIM, H),
                     f"{p}.self_attn.k_proj.weight": rnd(KV_HEADS * HEAD_DIM, H),
                     f"{p}.self_attn.v_proj.weight": rnd(KV_HEADS * HEAD_DIM, H),
                     f"{p}.self_attn.o_proj.weight": rnd(H, HEADS * HEAD_DIM),
                     f"{p}.self_attn.q_norm.weight": torch.ones(HEAD_DIM),
                     f"{p}.self_attn.k_norm.weight": torch.ones(HEAD_DIM),
                     f"{p}.input_layernorm.weight": torch.ones(H),
                     f"{p}.post_attention_layernorm.weight": torch.ones(H),
                     f"{p}.mlp.gate.weight": rnd(E, H)})
    cfg = config(layers, vocab)
    tok = Path(__file__).resolve().parents[1] / "tuckerize" / "demo" / "model"
    folders = {}

    def write(folder: Path, tensors: dict, cfg_out: dict):
        if (folder / "config.json").is_file():  # written by an earlier run with the same settings
            return folder
        folder.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(folder / "model.safetensors"))
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (folder / name).write_bytes((tok / name).read_bytes())
        if "tucker" in cfg_out:  # the manifest the plugin verifies the files against
            from tuckerize.checkpoint import sha256_file
            from tuckerize.format import MANIFEST_NAME

            (folder / "config.json").write_text(json.dumps(cfg_out, indent=1))
            record = {n: {"bytes": (folder / n).stat().st_size, "sha256": sha256_file(folder / n)}
                      for n in ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json")}
            manifest = {"tool": "tuckerize", "source": {"model": "bench/serve.py synthetic (random factors)"},
                        "files": {"model.safetensors": record.pop("model.safetensors")}, "side_files": record}
            (folder / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1))
        (folder / "config.json").write_text(json.dumps(cfg_out, indent=1))  # last: marks the folder complete
        return folder

    dense = dict(base)
    for n in range(layers if not (root / "dense" / "config.json").is_file() else 0):
        for e in range(E):
            p = f"model.layers.{n}.mlp.experts.{e}"
            dense[f"{p}.gate_proj.weight"] = rnd(I, H)
            dense[f"{p}.up_proj.weight"] = rnd(I, H)
            dense[f"{p}.down_proj.weight"] = rnd(H, I)
    folders["dense"] = write(root / "dense", dense, cfg)
    del dense
    for rE, rH, rI in ranks:
        tensors = dict(base)
        section = {"format_version": 1, "architecture": "qwen3_moe", "layers": {}}
        for n in range(layers):
            section["layers"][str(n)] = {}
            for proj in ("gate", "up", "down"):
                section["layers"][str(n)][proj] = {"ranks": [rE, rH, rI], "shape": [E, H, I]}
                prefix = f"model.layers.{n}.mlp.experts"
                for f, (rows, r) in {"U_E": (E, rE), "U_H": (H, rH), "U_I": (I, rI)}.items():
                    tensors[factor_name(prefix, proj, f)] = torch.linalg.qr(torch.randn(rows, r, generator=g))[0].contiguous()
                # core scaled so that W = core x U has entries of std ~ 0.02 like the dense weights
                tensors[factor_name(prefix, proj, "core")] = rnd(rE, rH, rI) * (E * H * I / (rE * rH * rI)) ** 0.5
        folders[f"tucker {rE},{rH},{rI}"] = write(root / f"tucker-{rE}-{rH}-{rI}", tensors, tucker_config(cfg, section))
    return folders


MAX_SEQS = 32
#: bytes per weight value of each dtype ``--dtype`` accepts
ITEMSIZE = {"float32": 4, "bfloat16": 2}


def kv_cache_bytes(layers: int, max_len: int) -> int:
    """The KV cache vLLM is given (``kv_cache_memory_bytes``): twice what ``MAX_SEQS``
    sequences of ``max_len`` tokens need in float32, at least 256 MiB. Set explicitly, vLLM's
    CPU backend skips its start-up check that a fraction of the machine's memory is free (which
    refuses to start while page cache is held)."""
    need = MAX_SEQS * max_len * layers * 2 * KV_HEADS * HEAD_DIM * 4
    return max(2 * need, 256 << 20)


def measure(folder: str, decode_tokens: int, prefill_prompts: int, prefill_len: int, tp: int = 1,
            layers: int = 2, repeats: int = 3, dtype: str = "float32") -> dict:
    """Runs in a child process: one vLLM engine, in-process at one rank, else vLLM's
    multiprocessing executor with one worker per rank. Each rate is measured ``repeats``
    times (fresh prompts each time); the median is reported, every run is kept (``runs``)."""
    import random

    if tp == 1:
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # apply_model across worker processes
    kv = kv_cache_bytes(layers, prefill_len + 64)
    if os.environ.get("VLLM_CPU_KVCACHE_SPACE"):  # vLLM's own variable wins over the argument: drop it
        del os.environ["VLLM_CPU_KVCACHE_SPACE"]
    from vllm import LLM, SamplingParams

    extra = {"distributed_executor_backend": "uni"} if tp == 1 else {}
    llm = LLM(model=folder, dtype=dtype, enforce_eager=True, max_model_len=prefill_len + 64, max_num_seqs=MAX_SEQS,
              tensor_parallel_size=tp, seed=0, max_num_batched_tokens=max(2048, prefill_len * 4),
              kv_cache_memory_bytes=kv, disable_log_stats=False, **extra)  # stats: per-request token times
    rng = random.Random(0)

    def prompts(n, length):
        return [{"prompt_token_ids": [rng.randrange(2, 4000) for _ in range(length)]} for _ in range(n)]

    def rate(n, length, new_tokens):
        """Tokens per second of one batch: with one new token, prompt tokens over the wall time
        (prefill); else ``(decode, wall)``: generated tokens after each request's first over the
        time from the batch's first first token to its last token (the decode steps only: the
        prompts' prefill is the prefill column's), and every generated token over the whole
        call's wall time (prefill included, as earlier tables were measured)."""
        params = SamplingParams(max_tokens=new_tokens, ignore_eos=True, temperature=0.0)
        t = time.perf_counter()
        out = llm.generate(prompts(n, length), params, use_tqdm=False)
        sec = time.perf_counter() - t
        if new_tokens == 1:
            return n * length / sec
        return decode_rate([o.metrics for o in out]), sum(len(o.outputs[0].token_ids) for o in out) / sec

    # importable by every worker: apply_model pickles them by reference at --tp > 1
    from tuckerize.integrations.vllm.probes import install_moe_timers, kernels_used, take_moe_times, weight_bytes

    rate(2, 16, 4)  # warm-up
    llm.apply_model(install_moe_timers)
    runs = {k: [] for k in RATES}
    calls: list[tuple[int, float]] = []  # (tokens, seconds) of every MoE block call on rank 0
    for _ in range(repeats):  # interleaved, so that a slow spell of the machine spreads over all rates
        runs["prefill_tokens_per_s"].append(rate(prefill_prompts, prefill_len, 1))
        for b in (1, 8, 32):
            llm.apply_model(take_moe_times)
            decode, wall = rate(b, 16, decode_tokens)
            runs[f"decode_b{b}_tokens_per_s"].append(decode)
            runs[f"decode_b{b}_wall_tokens_per_s"].append(wall)
            calls += llm.apply_model(take_moe_times)[0]
    res = {k: statistics.median(v) for k, v in runs.items()}
    res["runs"] = runs
    res["moe_ms_per_call"] = {f"b{b}": ms for b, ms in moe_ms_by_tokens(calls, (1, 8, 32)).items()}

    res["weight_bytes"] = max(llm.apply_model(weight_bytes), key=lambda b: b["all"])  # the fullest rank
    res["kv_cache_bytes"] = kv
    res["kernels"] = sorted(set().union(*llm.apply_model(kernels_used)))
    return res


#: the dense model's second run, after every Tucker model (merged into "dense": :func:`faster_baseline`)
DENSE_AGAIN = "dense, again"
RATES = ("prefill_tokens_per_s", *(f"decode_b{b}{k}_tokens_per_s" for b in (1, 8, 32) for k in ("", "_wall")))


def faster_baseline(first: dict, again: dict) -> dict:
    """The dense baseline from its two runs, first and last of the bench: each rate the faster
    of the two, each MoE block time the shorter. Measured here: the model run first can land
    in a slow spell of the machine even after the warm-up (dense at batch 8 1.5x slower than in
    the next run of the bench, Tucker alike in both), which flatters every ratio; taking the
    faster dense can only lower them. Both runs are kept (``baseline_runs``)."""
    out = dict(first)
    for k in RATES:
        out[k] = max(first[k], again[k])
    out["moe_ms_per_call"] = {b: min((v for v in (ms, again["moe_ms_per_call"][b]) if v is not None), default=None)
                              for b, ms in first["moe_ms_per_call"].items()}
    out["baseline_runs"] = {"first": {k: first[k] for k in (*RATES, "moe_ms_per_call", "machine", "runs")},
                            "last": {k: again[k] for k in (*RATES, "moe_ms_per_call", "machine", "runs")}}
    return out


def decode_rate(metrics) -> float:
    """Decode tokens per second of one batch from vLLM's per-request stats (``RequestOutput.metrics``,
    kept with ``disable_log_stats=False``): the tokens generated after each request's first, over the
    time from the earliest first token to the latest last token (engine timestamps)."""
    if any(m is None for m in metrics):
        raise RuntimeError("vLLM returned no request metrics: the engine must keep its stats (disable_log_stats=False)")
    tokens = sum(m.num_generation_tokens - 1 for m in metrics)
    span = max(m.last_token_ts for m in metrics) - min(m.first_token_ts for m in metrics)
    return tokens / span


def moe_ms_by_tokens(calls: list[tuple[int, float]], tokens: tuple[int, ...]) -> dict[int, float | None]:
    """Median milliseconds of one MoE block call with exactly ``t`` tokens, for each ``t``: the
    decode steps at batch ``t`` (a batch's prompts all prefill in one larger call)."""
    out = {}
    for t in tokens:
        sec = [s for n, s in calls if n == t]
        out[t] = 1e3 * statistics.median(sec) if sec else None
    return out


def warm_up(seconds: float) -> None:
    """Keep every core reading and multiplying for ``seconds`` before the first model. Measured
    here: the first minute or two after an idle spell runs this VM up to 1.5x slower (every
    model alike; no steal time shows in /proc/stat), so without it the first model measured
    (dense) lands in that spell and the ratios drift from run to run."""
    import torch

    a = torch.randn(4096, 4096)
    b = torch.empty_like(a)
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        b.copy_(a)
        torch.mm(a[:256], b)


@contextlib.contextmanager
def busy_cores(n: int):
    """``n`` processes that each keep one core busy (``while True: pass``) for the duration:
    the bench under contention, as on a shared host (``--busy``). They are stopped on the way
    out, whatever happens inside."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        yield procs
    finally:
        for proc in procs:
            proc.kill()
        for proc in procs:
            proc.wait()


def machine_state() -> dict:
    """Load average, and CPU-seconds: the whole machine's busy time since boot and this
    process's reaped children's (the vLLM runs); differences of two readings give what other
    processes used meanwhile."""
    with open("/proc/stat") as f:
        cpu = [int(v) for v in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
    tck = os.sysconf("SC_CLK_TCK")
    t = os.times()
    return {"load": float(open("/proc/loadavg").read().split()[0]), "busy_s": (sum(cpu) - cpu[3] - cpu[4]) / tck,
            "children_s": t.children_user + t.children_system, "wall": time.time()}


def load_during(before: dict, after: dict) -> dict:
    """How busy the machine was during one run: load averages, and the cores other processes
    kept busy on average (machine busy time minus this run's CPU time, over the wall time)."""
    wall = max(after["wall"] - before["wall"], 1e-9)
    ours = after["children_s"] - before["children_s"]
    others = max(0.0, after["busy_s"] - before["busy_s"] - ours)
    return {"load_before": before["load"], "load_after": after["load"], "seconds": round(wall, 1),
            "this_run_cores": round(ours / wall, 2), "other_processes_cores": round(others / wall, 2)}


def step_bytes(layers: int, vocab: int, ranks: tuple[int, int, int] | None, batch: int,
               dtype: str = "float32") -> float:
    """Weight bytes one decode step reads (in ``dtype``) with ``batch`` sequences: attention,
    router and norms of every layer, the LM head, and the experts touched: on average
    E (1 - (1 - K/E)^batch) of them per layer (routing spread evenly); dense 3 H I values
    each, Tucker 3 r_H r_I (its core; U_H and U_I, read once per layer, are shared)."""
    attn = 2 * HEADS * HEAD_DIM * H + 2 * KV_HEADS * HEAD_DIM * H + E * H + 2 * H + 2 * HEAD_DIM
    touched = E * (1 - (1 - K / E) ** batch)
    if ranks is None:
        experts = touched * 3 * H * I
    else:
        rE, rH, rI = ranks
        experts = 3 * H * rH + 3 * I * rI + touched * 3 * rH * rI
    return float(ITEMSIZE[dtype]) * (layers * (attn + experts) + vocab * H + H)  # and the final norm


def serve_one(args, name: str, folder: Path, settings: dict[str, str]) -> dict:
    """One model served by vLLM in its own process (``--child``), with the plugin's
    ``settings`` (environment variables: ``TUCKERIZE_LAYOUT``, ``TUCKERIZE_KERNEL``): its
    rates, how busy the machine was meanwhile, its checkpoint's size and the bytes a decode
    step reads."""
    env = {**os.environ, **settings}
    if args.tp > 1:
        env.setdefault("VLLM_CPU_OMP_THREADS_BIND", "|".join(str(r % (os.cpu_count() or 1)) for r in range(args.tp)))
    before = machine_state()
    proc = subprocess.run([sys.executable, __file__, "--child", str(folder), "--decode-tokens", str(args.decode_tokens),
                           "--prefill-prompts", str(args.prefill_prompts), "--prefill-len", str(args.prefill_len),
                           "--tp", str(args.tp), "--layers", str(args.layers), "--dtype", args.dtype],
                          capture_output=True, text=True, env=env)
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode != 0 or not line:
        raise SystemExit(f"{name}: vLLM run failed:\n{proc.stderr[-3000:]}")
    result = json.loads(line[0][7:])
    result["machine"] = load_during(before, machine_state())
    result["checkpoint_bytes"] = sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))
    rank_set = None if name in ("dense", DENSE_AGAIN) else tuple(int(v) for v in name.split()[1].split(","))
    result["step_bytes"] = {f"b{b}": step_bytes(args.layers, args.vocab, rank_set, b, args.dtype) for b in (1, 8, 32)}
    print(f"{name}: done, {json.dumps(result['machine'])}", file=sys.stderr, flush=True)
    return result


def main() -> None:
    global E, H, I
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--ranks", default="64,512,256;128,1024,512;8,16,16",
                    help="Tucker rank sets; the default's 8,16,16 is the floor: experts that read almost nothing "
                         "(what the rest of the step costs)")
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--prefill-prompts", type=int, default=4)
    ap.add_argument("--prefill-len", type=int, default=256)
    ap.add_argument("--root", default="runs/bench-serve")
    ap.add_argument("--out", default="bench/results/serve.json")
    ap.add_argument("--tp", type=int, default=1, help="tensor-parallel size of every model")
    ap.add_argument("--shape", default=f"{E},{H},{I}", help="E,H,I of the experts (a smaller one for a smoke run)")
    ap.add_argument("--layouts", default="intermediate,expert,hybrid,hybrid-replicated-out",
                    help="Tucker layouts served at --tp > 1")
    ap.add_argument("--kernels", default="",
                    help="Tucker kernels (TUCKERIZE_KERNEL), each Tucker model served once per kernel in the same run "
                         "(default: the plugin's own choice, once)")
    ap.add_argument("--warm-up", type=float, default=90.0,
                    help="seconds of CPU and memory work before the first model (0: none)")
    ap.add_argument("--dtype", default="float32", choices=tuple(ITEMSIZE),
                    help="vLLM's dtype for every model (the checkpoints are written in float32 and cast at load)")
    ap.add_argument("--busy", type=int, default=0,
                    help="processes that each keep a core busy during every model's run (contention; 0: none)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(measure(args.child, args.decode_tokens, args.prefill_prompts, args.prefill_len,
                                             args.tp, args.layers, dtype=args.dtype)))
        return
    E, H, I = (int(x) for x in args.shape.split(","))
    ranks = [tuple(int(x) for x in r.split(",")) for r in args.ranks.split(";")]
    folders = build(Path(args.root), args.layers, args.vocab, ranks)
    runs = []  # (row name, folder, the plugin's settings)
    kernels = [k for k in args.kernels.split(",") if k] or [None]
    for name, folder in folders.items():
        if name == "dense":
            runs.append((name, folder, {}))
            continue
        for layout in [None] if args.tp == 1 else args.layouts.split(","):
            for kernel in kernels:
                settings = {k: v for k, v in (("TUCKERIZE_LAYOUT", layout), ("TUCKERIZE_KERNEL", kernel)) if v}
                runs.append((" ".join([name, *settings.values()]), folder, settings))
    runs.append((DENSE_AGAIN, folders["dense"], {}))  # the baseline again, last: see faster_baseline
    results = {}
    warm_up(args.warm_up)
    with busy_cores(args.busy):
        for name, folder, settings in runs:
            results[name] = serve_one(args, name, folder, settings)
    results["dense"] = faster_baseline(results["dense"], results.pop(DENSE_AGAIN))
    import torch
    import vllm

    report = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
              "vllm": vllm.__version__, "torch": torch.__version__, "dtype": args.dtype, "tp": args.tp,
              "warm_up_seconds": args.warm_up, "busy_processes": args.busy,
              "shapes": {"E": E, "H": H, "I": I, "top_k": K, "layers": args.layers, "vocab": args.vocab},
              "command": "python bench/serve.py " + " ".join(sys.argv[1:]), "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    dense = results["dense"]
    keys = ["decode_b1_tokens_per_s", "decode_b8_tokens_per_s", "decode_b32_tokens_per_s", "prefill_tokens_per_s"]
    print("| model | decode b=1 | decode b=8 | decode b=32 | prefill | weights in memory (MoE) | checkpoint |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        cells = [f"{r[k]:.1f} ({r[k] / dense[k]:.2f}x)" for k in keys]
        mem = f"{r['weight_bytes']['all'] / 2**30:.2f} GiB ({r['weight_bytes']['moe'] / 2**30:.2f})"
        print(f"| {name} | " + " | ".join(cells) + f" | {mem} | {r['checkpoint_bytes'] / 2**30:.2f} GiB |")
    print()
    print("| model | bytes bound b=1 | b=8 | b=32 | load before / after | other processes (cores) |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        bound = [f"{dense['step_bytes'][b] / r['step_bytes'][b]:.2f}x" for b in ("b1", "b8", "b32")]
        m = r["machine"]
        print(f"| {name} | " + " | ".join(bound) + f" | {m['load_before']:.1f} / {m['load_after']:.1f} | "
              f"{m['other_processes_cores']:.2f} |")
    print()
    print("| model | decode b=1, wall (prefill included) | b=8 | b=32 | MoE block ms per call, b=1 | b=8 | b=32 |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        wall = [f"decode_b{b}_wall_tokens_per_s" for b in (1, 8, 32)]
        cells = [f"{r[k]:.1f} ({r[k] / dense[k]:.2f}x)" for k in wall]
        ms = [(r["moe_ms_per_call"][b], dense["moe_ms_per_call"][b]) for b in ("b1", "b8", "b32")]
        cells += ["-" if t is None or d is None else f"{t:.3f} ({d / t:.2f}x)" for t, d in ms]
        print(f"| {name} | " + " | ".join(cells) + " |")
    print()
    for name, r in results.items():
        kernel = ", ".join(r["kernels"]) or "vLLM's own MoE layer"
        print(f"{name}: kernel {kernel}")


if __name__ == "__main__":
    main()

"""Calibration-aware Tucker: held-out perplexity at equal expert-parameter budgets.

For the embedded demo Qwen3-MoE (tuckerize/demo/model) and the Mixtral-named demo
(tuckerize/demo/mixtral), at 25% and 50% of the routed-expert parameters removed:

* baseline (dense experts),
* plain Tucker, uniform ranks (one (r_E, r_H, r_I) for every layer and projection),
* whitened Tucker (the default: per-expert two-sided weights, ALS), the same uniform ranks,
* whitened Tucker with the pooled whitening (``--whitening pooled``), the same ranks,
* whitened Tucker, ranks allocated to the same budget (``--ratio``),
* (extra) ``--refit``, ``--expert-hidden``, ``--sequential``, ``--whitening pooled
  --refit``, plain Tucker allocated on unwhitened spectra.

Perplexity: heldout.txt (never trained on, disjoint from the calibration text, checked
here), tokenised whole, non-overlapping windows of 256 tokens, mean next-token
cross-entropy over all windows, exp; the native runtime (``CausalLM``) in float32.
Calibration: ``--calibration demo`` (tuckerize/demo/calibration.txt, cut from the
training plays), 128 windows of 256 tokens, statistics collected once per model and
reused by every run (``--stats``).

    python bench/calibration.py                  # the table (about 3 minutes on 2 cores)
    python bench/calibration.py --ablations      # the measurements behind the defaults
    python bench/calibration.py --memory         # calibration time / peak RSS, Qwen3-30B-A3B shapes
    python bench/calibration.py --scale          # per-expert ALS vs pooled whitening, one Qwen3-30B-A3B projection
    python bench/calibration.py --storage        # per-expert statistics in float16 / bfloat16 / low rank vs float32

The memory run generates (bench/memory.py's generator, real vocabulary 151,936) a bf16
checkpoint with Qwen3-30B-A3B's layer shapes and runs ``collect_statistics`` on random
token ids (the generated checkpoint has no tokenizer) in a fresh process per setting,
reading that process's peak RSS.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
MODELS = {"qwen3_moe demo": REPO / "tuckerize" / "demo" / "model", "mixtral demo": REPO / "tuckerize" / "demo" / "mixtral"}
OUT = REPO / "bench" / "out"
EVAL_SEQLEN = 256


# ----------------------------------------------------------------------------- evaluation


def heldout_windows(folder: Path, seqlen: int = EVAL_SEQLEN) -> torch.Tensor:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    ids = tok((folder / "heldout.txt").read_text(), add_special_tokens=False, verbose=False)["input_ids"]
    n = len(ids) // seqlen
    return torch.tensor(ids[: n * seqlen], dtype=torch.long).view(n, seqlen)


@torch.no_grad()
def perplexity(folder: Path, windows: torch.Tensor, dense: bool, batch: int = 32) -> float:
    from tuckerize.runtime.loader import TensorSource
    from tuckerize.runtime.model import CausalLM

    model = CausalLM(TensorSource.open(folder), dense_experts=dense, dtype=torch.float32)
    nll, count = 0.0, 0
    for i in range(0, windows.shape[0], batch):
        x = windows[i : i + batch]
        logits = model(x)[:, :-1].float()
        nll += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                                       reduction="sum"))
        count += x[:, 1:].numel()
    return math.exp(nll / count)


def check_disjoint(calibration: str, heldout: Path) -> None:
    """No line of 40+ characters of the held-out text occurs in the calibration text."""
    from tuckerize.text import read_text

    text, _ = read_text(calibration)
    lines = {line.strip() for line in text.splitlines()}
    shared = [line for line in heldout.read_text().splitlines() if len(line.strip()) >= 40 and line.strip() in lines]
    if shared:
        raise SystemExit(f"calibration text overlaps heldout.txt: {shared[0]!r}")


# ----------------------------------------------------------------------------- runs


class Bench:
    def __init__(self, name: str, folder: Path, work: Path, samples: int, seqlen: int):
        from tuckerize.arch import moe_spec
        from tuckerize.checkpoint import load_config

        self.name, self.folder, self.work = name, folder, work
        self.samples, self.seqlen = samples, seqlen
        self.spec = moe_spec(load_config(folder))
        self.windows = heldout_windows(folder)
        self.n_tensors = 3 * len(self.spec.moe_layers)
        self.dense = self.n_tensors * math.prod(self.spec.shape)
        self.stats: Path | None = None
        self.count = 0

    def baseline(self) -> float:
        return perplexity(self.folder, self.windows, dense=True)

    def calibrate(self) -> float:
        """Collect the statistics once (a calibrated run at full ranks would cost the same)."""
        from tuckerize.compress import decompose_checkpoint

        out = self.work / "stats"
        t = time.time()
        E, H, I = self.spec.shape
        decompose_checkpoint(str(self.folder), out, ranks=(E, H, I), calibration="demo", samples=self.samples,
                             seqlen=self.seqlen, overwrite=True)
        self.stats = out
        return time.time() - t

    def run(self, label: str, **kw) -> dict:
        from tuckerize.compress import decompose_checkpoint

        self.count += 1
        out = self.work / f"run{self.count}"
        if kw.pop("calibrated", False):
            kw.setdefault("stats", self.stats)
        kw.setdefault("save_config", self.work / f"run{self.count}.yaml")
        t = time.time()
        manifest = decompose_checkpoint(str(self.folder), out, overwrite=True, **kw)
        secs = time.time() - t
        ppl = perplexity(out, self.windows, dense=False)
        row = {"model": self.name, "variant": label, "ppl": ppl, "params": manifest["params"]["experts_after"],
               "kept": manifest["params"]["experts_after"] / self.dense, "seconds": round(secs, 2),
               "ranks": {f"{t['layer']}.{t['projection']}": t["ranks"] for t in manifest["tensors"]},
               "out": str(out)}
        if "allocation" in manifest:
            row["config"] = (out / "rank_plan.yaml").read_text()
        print(f"  {self.name:15s} {label:42s} ppl {ppl:8.3f}  params {row['params']:>9,} ({row['kept']:.2%})", flush=True)
        return row

    def uniform(self, ratio: float, expert_rank: int | None = None) -> tuple[int, int, int]:
        from tuckerize.allocate import uniform_ranks

        return uniform_ranks(self.spec.shape, self.n_tensors, round(ratio * self.dense), expert_rank=expert_rank)


def main_table(args) -> list[dict]:
    from tuckerize.calibration.weights import WhitenOptions

    rows = []
    for name, folder in MODELS.items():
        check_disjoint("demo", folder / "heldout.txt")
        b = Bench(name, folder, args.work / folder.name, args.samples, args.seqlen)
        base = b.baseline()
        rows.append({"model": name, "variant": "baseline", "ppl": base, "params": b.dense, "kept": 1.0})
        print(f"  {name:15s} {'baseline':42s} ppl {base:8.3f}  params {b.dense:>9,}", flush=True)
        cal_s = b.calibrate()
        rows[-1]["calibration_seconds"] = round(cal_s, 2)
        pooled = WhitenOptions(method="pooled")
        cal = {"calibration": "demo", "samples": args.samples, "seqlen": args.seqlen}
        for ratio in args.ratios:
            u = b.uniform(ratio)
            tag = f"{1 - ratio:.0%} removed"

            def add(kind, label, **kw):
                rows.append(b.run(f"{label} ({tag})", **kw) | {"ratio": ratio, "kind": kind})

            add("plain-uniform", f"plain, uniform {u}", ranks=u)
            add("whitened-uniform", f"whitened (per-expert), uniform {u}", ranks=u, calibrated=True)
            add("pooled-uniform", f"whitened (pooled), uniform {u}", ranks=u, calibrated=True, whiten_options=pooled)
            add("whitened-uniform+expert-hidden", f"whitened (per-expert, --expert-hidden), uniform {u}", ranks=u,
                per_expert_stats=True, whiten_options=WhitenOptions(expert_hidden=True), **cal)
            add("whitened-uniform+sequential", f"whitened (per-expert, --sequential), uniform {u}", ranks=u,
                sequential=True, **cal)
            add("whitened-uniform+refit", f"whitened (per-expert, --refit), uniform {u}", ranks=u, stats=b.stats,
                refit=True, **cal)
            add("whitened-allocated", "whitened (per-expert), allocated", ratio=ratio, calibrated=True)
            add("plain-allocated", "plain, allocated", ratio=ratio)
            add("whitened-allocated+refit", "whitened (per-expert, --refit), allocated", ratio=ratio,
                stats=b.stats, refit=True, **cal)
            add("pooled-allocated+refit", "whitened (pooled, --refit), allocated", ratio=ratio, stats=b.stats,
                refit=True, whiten_options=pooled, **cal)
            add("whitened-allocated+expert-hidden", "whitened (per-expert, --expert-hidden), allocated", ratio=ratio,
                per_expert_stats=True, whiten_options=WhitenOptions(expert_hidden=True), **cal)
        if args.output_errors:
            rows.extend(output_errors(b, args))
    return rows


def output_errors(b: Bench, args) -> list[dict]:
    """Per-layer MoE block output error on calibration inputs: plain vs whitened, same ranks."""
    sys.path.insert(0, str(REPO / "tests"))
    from moe_errors import moe_output_errors

    from tuckerize.calibration.tokens import calibration_tokens
    from tuckerize.calibration.weights import WhitenOptions
    from tuckerize.text import read_text

    text, _ = read_text("demo")
    tokens = calibration_tokens(text, b.folder, args.samples, args.seqlen)
    rows = []
    for ratio in args.ratios:
        u = b.uniform(ratio)
        plain = b.run(f"plain, uniform {u}", ranks=u)
        pooled = b.run(f"whitened (pooled), uniform {u}", ranks=u, calibrated=True,
                       whiten_options=WhitenOptions(method="pooled"))
        white = b.run(f"whitened (per-expert), uniform {u}", ranks=u, calibrated=True)
        errs = moe_output_errors(b.folder, [plain["out"], pooled["out"], white["out"]], tokens)
        rows.append({"model": b.name, "variant": "block output error", "ratio": ratio, "ranks": list(u),
                     "plain": errs[0], "pooled": errs[1], "whitened": errs[2]})
        print(f"  {b.name:15s} block output error at {u}: plain {[round(v, 4) for v in errs[0].values()]} "
              f"pooled {[round(v, 4) for v in errs[1].values()]} per-expert {[round(v, 4) for v in errs[2].values()]}",
              flush=True)
    return rows


def ablations(args) -> list[dict]:
    """The measurements behind the defaults, at 25% and 50% removed on both demo models."""
    from tuckerize.calibration.weights import WhitenOptions

    rows = []
    for name, folder in MODELS.items():
        b = Bench(name, folder, args.work / (folder.name + "-abl"), args.samples, args.seqlen)
        b.calibrate()
        cal = {"calibration": "demo", "samples": args.samples, "seqlen": args.seqlen}
        for ratio in args.ratios:
            u = b.uniform(ratio)
            tag = f"{1 - ratio:.0%} removed"

            def add(label, **kw):
                rows.append(b.run(f"{label} ({tag})", **kw) | {"ratio": ratio, "ablation": label})

            pooled = WhitenOptions(method="pooled")
            add("uniform, plain", ranks=u)
            for damp in (0.01, 0.03, 0.1, 0.3, 1.0):
                add(f"uniform, per-expert, ridge {damp:g}" + (" (default)" if damp == 0.1 else ""), ranks=u,
                    calibrated=True, whiten_options=WhitenOptions(damp=damp))
            for it in (0, 1, 10):
                add(f"uniform, per-expert, {it} ALS sweeps (default 3)", ranks=u, calibrated=True,
                    whiten_options=WhitenOptions(iters=it))
            add("uniform, per-expert, every routed token once on the hidden side", ranks=u, calibrated=True,
                whiten_options=WhitenOptions(weighting="tokens"))
            add("uniform, per-expert, --refit", ranks=u, stats=b.stats, refit=True, **cal)
            add("uniform, pooled (ridge 1, its default)", ranks=u, calibrated=True, whiten_options=pooled)
            E = b.spec.num_experts
            u_e = b.uniform(ratio, expert_rank=E * 3 // 4)
            add(f"uniform r_E={E * 3 // 4} {u_e}, per-expert", ranks=u_e, calibrated=True)
            add(f"uniform r_E={E * 3 // 4} {u_e}, pooled", ranks=u_e, calibrated=True, whiten_options=pooled)
    return rows


def ablation_markdown(rows: list[dict]) -> str:
    lines = ["| model | variant | 25% removed | 50% removed |", "|---|---|---:|---:|"]
    for m in dict.fromkeys(r["model"] for r in rows):
        for label in dict.fromkeys(r["ablation"] for r in rows if r["model"] == m):
            cells = []
            for ratio in (0.75, 0.5):
                r = next((r for r in rows if r["model"] == m and r["ablation"] == label and r["ratio"] == ratio), None)
                cells.append(f"{r['ppl']:.2f}" if r else "")
            lines.append(f"| {m} | {label} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- memory


CHILD = r"""
import json, resource, sys, time, torch
torch.manual_seed(0)
from tuckerize.calibration.collect import collect_statistics
from tuckerize.calibration.store import CalibrationSettings
folder, samples, seqlen, vocab = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
tokens = torch.randint(0, vocab, (samples, seqlen))
rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.time()
s = collect_statistics(folder, CalibrationSettings("random tokens", samples, seqlen, "-"), tokens,
                       out=folder + "-stats")
print(json.dumps({"seconds": time.time() - t, "rss_before_kib": rss0,
                  "layers": len(s.layers), "tokens": float(s.layers[0]["tokens"])}))
"""


SCALE_CHILD = r"""
import json, sys, time, torch
from tuckerize.decompose.expert_weighted import expert_weighted_tucker, ridge
from tuckerize.decompose.whiten import whitened_tucker, whitening
method, iters = sys.argv[1], int(sys.argv[2])
E, H, I = 128, 2048, 768  # Qwen3-30B-A3B's routed experts, one projection (gate/up kind: weights on both sides)
rank = (128, 512, 256)    # r_E = E, as every allocated plan keeps
g = torch.Generator().manual_seed(0)
T = torch.randn(E, H, I, generator=g) * 0.02
x = torch.randn(8192, H, generator=g) * torch.logspace(0, -2, H)
A = ridge(x.T.double() @ x.double(), 0.1)
del x
B = torch.empty(E, I, I, dtype=torch.float64)
for e in range(E):  # each expert its own important intermediate directions
    a = torch.randn(256, I, generator=g) * torch.logspace(0, -2, I)[torch.randperm(I, generator=g)]
    B[e] = a.T.double() @ a.double()
B = ridge(B, 0.1)
t = time.time()
pooled = whitened_tucker(T, rank, [None, whitening(A, 0.1), whitening(B.sum(0), 0.1)])
out = {"pooled_seconds": time.time() - t, "pooled_error": pooled.relative_error}
if method == "expert":
    t = time.time()
    res = expert_weighted_tucker(T, rank, A, B, init=pooled, iters=iters)
    out.update(expert_seconds=time.time() - t, history=res.error_history)
print(json.dumps(out))
"""


def scale(args) -> list[dict]:
    """Time and peak memory of one Qwen3-30B-A3B-shaped projection: the pooled whitening
    (closed form) alone, then followed by the per-expert ALS, in fresh processes."""
    rows = []
    for method in ("pooled", "expert"):
        info, gib = peak_rss([sys.executable, "-c", SCALE_CHILD, method, str(args.scale_iters)])
        rows.append({"method": method, "peak_rss_gib": gib, **info})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def peak_rss(cmd: list[str]) -> tuple[dict, float]:
    wrapper = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
               "sys.stderr.write(r.stderr[-3000:]); print(r.stdout.strip().splitlines()[-1] if r.returncode == 0 else 'FAIL'); "
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True)
    lines = out.stdout.strip().splitlines()
    if not lines or lines[0] == "FAIL":
        raise SystemExit(f"calibration failed: {out.stderr[-2000:]}")
    return json.loads(lines[0]), int(lines[1]) / 2**20


def memory(args) -> list[dict]:
    sys.path.insert(0, str(REPO / "bench"))
    import memory as mem  # the generator of bench/memory.py (Qwen3-30B-A3B shapes)

    root = Path(args.mem_dir)
    combos = args.mem_runs  # (layers, samples, seqlen)
    most = max(c[0] for c in combos)
    full = root / f"full-{most}"
    if not (full / "config.json").is_file():
        t = time.time()
        mem.write_checkpoint(full, most, torch.Generator().manual_seed(0))
        print(f"generated {full} in {time.time() - t:.0f} s", flush=True)
    rows = []
    for n, samples, seqlen in combos:
        src = root / f"layers-{n}"
        if not (src / "config.json").is_file():
            mem.subset(full, src, n)
        info, gib = peak_rss([sys.executable, "-c", CHILD, str(src), str(samples), str(seqlen), str(mem.V)])
        E, H, I = mem.E, mem.H, mem.I
        attn = (mem.HEADS * mem.HD * H * 2 + 2 * mem.KV * mem.HD * H) * 4  # float32 in the runtime
        row = {"layers": n, "samples": samples, "seqlen": seqlen, "peak_rss_gib": gib,
               "seconds": info["seconds"], "rss_after_import_gib": info["rss_before_kib"] / 2**20,
               "experts_one_layer_bf16_gib": 3 * E * H * I * 2 / 2**30,
               "attention_one_layer_f32_gib": attn / 2**30,
               "kept_activations_gib": samples * seqlen * H * 4 / 2**30,
               "embedding_bf16_gib": mem.V * H * 2 / 2**30}
        rows.append(row)
        print(json.dumps(row), flush=True)
    if not args.keep:
        shutil.rmtree(root)
    return rows


# ----------------------------------------------------------------------------- statistics on disk


def degrade(m: torch.Tensor, how: str) -> torch.Tensor:
    """One per-expert field [E, I, I] as it would come back from a smaller storage format."""
    m = m.double()
    if how == "float32":
        return m.float()
    if how == "bfloat16":
        return m.to(torch.bfloat16).float()
    if how == "float16":  # scaled per expert by its largest entry (sums of squares overflow float16 otherwise)
        from tuckerize.calibration.store import dequantize_expert, quantize_expert

        return dequantize_expert(*quantize_expert(m))
    if how.startswith("rank"):  # top-k eigenpairs per expert plus the mean of the other eigenvalues times identity
        k = int(how[4:])
        vals, vecs = torch.linalg.eigh(0.5 * (m + m.transpose(1, 2)))
        top, V = vals[:, -k:], vecs[:, :, -k:]
        rest = vals[:, :-k].clamp_min(0).mean(1)
        eye = torch.eye(m.shape[1], dtype=torch.float64)
        return ((V * top[:, None, :]) @ V.transpose(1, 2) + rest[:, None, None] * eye).float()
    raise ValueError(how)


def stored_bytes(shape: tuple[int, ...], how: str) -> int:
    E, I, _ = shape
    if how == "float32":
        return E * I * I * 4
    if how in ("float16", "bfloat16"):
        return E * I * I * 2 + (E * 4 if how == "float16" else 0)
    k = int(how[4:])
    return E * (k * I + k + 1) * 4


def storage(args) -> list[dict]:
    """Per-expert [E, I, I] statistics stored smaller (float16 scaled per expert: the
    format since version 3, bfloat16, top-k eigenpairs + isotropic rest) vs float32 (format
    2): held-out perplexity of the per-expert weighted decomposition from each, same
    uniform ranks. The statistics files of this run are written in float32 (format 2's
    layout), each variant's values degraded here."""
    import tuckerize.calibration.store as store
    from tuckerize.calibration.stats import EXPERT_FIELDS
    from tuckerize.calibration.store import CalibrationStats

    store.stored_dtype = lambda name: "F32" if name.rsplit(".", 1)[-1].endswith("_expert") else "F64"

    rows = []
    for name, folder in MODELS.items():
        b = Bench(name, folder, args.work / (folder.name + "-storage"), args.samples, args.seqlen)
        base = b.baseline()
        b.calibrate()
        ref = CalibrationStats.load(b.stats)
        I = b.spec.shape[2]
        variants = ["float32", "float16", "bfloat16", f"rank{I // 2}", f"rank{I // 4}", f"rank{I // 8}"]
        for how in variants:
            folder_v = b.work / f"stats-{how}"
            layers = {}
            for L in ref.layers:
                fields = dict(ref.layers[L])
                for k in EXPERT_FIELDS:
                    fields[k] = degrade(fields[k], how)
                layers[L] = fields
            CalibrationStats(settings=ref.settings, layers=layers).save(folder_v)
            shape = tuple(ref.layers[next(iter(ref.layers))]["inter_expert"].shape)
            for ratio in args.ratios:
                u = b.uniform(ratio)
                row = b.run(f"per-expert, stats {how}, uniform {u} ({1 - ratio:.0%} removed)", ranks=u, stats=folder_v)
                rows.append(row | {"storage": how, "ratio": ratio, "baseline_ppl": base,
                                   "bytes_per_layer": len(EXPERT_FIELDS) * stored_bytes(shape, how)})
    return rows


def storage_markdown(rows: list[dict]) -> str:
    lines = ["| model | removed | per-expert statistics stored as | bytes per layer (vs float32) | perplexity | vs float32 |",
             "|---|---:|---|---:|---:|---:|"]
    for r in rows:
        ref = next(x for x in rows if x["model"] == r["model"] and x["ratio"] == r["ratio"] and x["storage"] == "float32")
        ref_b = ref["bytes_per_layer"]
        lines.append(f"| {r['model']} | {1 - r['ratio']:.0%} | {r['storage']} | {r['bytes_per_layer']:,} "
                     f"({r['bytes_per_layer'] / ref_b:.2f}x) | {r['ppl']:.3f} | {r['ppl'] / ref['ppl'] - 1:+.2%} |")
    return "\n".join(lines)


def markdown(rows: list[dict]) -> str:
    lines = []
    models = list(dict.fromkeys(r["model"] for r in rows if "ppl" in r))
    for m in models:
        base = next(r for r in rows if r["model"] == m and r["variant"] == "baseline")
        lines.append(f"\n{m} (baseline perplexity {base['ppl']:.2f}, {base['params']:,} routed-expert parameters)\n")
        lines.append("| removed | variant | ranks | expert params | perplexity | vs baseline | gap closed vs plain |")
        lines.append("|---:|---|---|---:|---:|---:|---:|")
        for ratio in sorted({r["ratio"] for r in rows if r.get("ratio") and r["model"] == m and "kind" in r}, reverse=True):
            group = [r for r in rows if r["model"] == m and r.get("ratio") == ratio and "kind" in r]
            plain = next(r for r in group if r["kind"] == "plain-uniform")
            for r in group:
                ranks = r["variant"].split("uniform ")[1].split(" (")[0] if "uniform" in r["variant"] else "allocated"
                closed = 1 - (r["ppl"] - base["ppl"]) / (plain["ppl"] - base["ppl"])
                lines.append(f"| {1 - ratio:.0%} | {r['kind']} | {ranks} | {r['params']:,} ({r['kept']:.2%}) | "
                             f"{r['ppl']:.2f} | {r['ppl'] / base['ppl'] - 1:+.1%} | {closed:.0%} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ablations", action="store_true")
    ap.add_argument("--memory", action="store_true")
    ap.add_argument("--storage", action="store_true",
                    help="per-expert statistics stored in float16/bfloat16/low rank vs float32: perplexity")
    ap.add_argument("--scale", action="store_true", help="time/memory of the per-expert ALS at Qwen3-30B-A3B shapes")
    ap.add_argument("--scale-iters", type=int, default=3)
    ap.add_argument("--output-errors", action="store_true", help="also per-layer block output errors")
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--ratios", default="0.75,0.5")
    ap.add_argument("--work", type=Path, default=Path("/tmp/tuckerize-bench-calibration"))
    ap.add_argument("--mem-dir", default="/tmp/tuckerize-calibration-qwen3-shapes")
    ap.add_argument("--mem-runs", default="2x16x256,4x16x256,2x64x512",
                    help="LAYERSxSAMPLESxSEQLEN, comma-separated")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    args.ratios = [float(x) for x in args.ratios.split(",")]
    args.mem_runs = [tuple(int(v) for v in t.split("x")) for t in args.mem_runs.split(",")]
    OUT.mkdir(parents=True, exist_ok=True)
    meta = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
            "threads": torch.get_num_threads(), "command": " ".join(sys.argv)}
    print(meta, flush=True)
    if args.scale:
        rows = scale(args)
        (OUT / "calibration_scale.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        return
    if args.memory:
        rows = memory(args)
        (OUT / "calibration_memory.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        return
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    if args.storage:
        rows = storage(args)
        (OUT / "calibration_storage.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        print(storage_markdown(rows))
        return
    if args.ablations:
        rows = ablations(args)
        (OUT / "calibration_ablations.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        print(ablation_markdown(rows))
        return
    rows = main_table(args)
    (OUT / "calibration.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(markdown(rows))


if __name__ == "__main__":
    main()

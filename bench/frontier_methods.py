"""Methods for the bytes frontier (issue 23), compared on the SELECTION split of both demo models.

Every method approximates each MoE projection's experts ``T [E, H, I]`` and is scored by the
product's evaluation code (``tuckerize.evaluate``: native runtime, float32, perplexity and
KL(original || method) on the original's top-256 plus a rest bucket, top-1 agreement) on
windows 0-49 of the demo's ``heldout.txt`` (256 tokens each), the selection split of
bench/compare.py. The report split (windows 50-198) is never scored here: settings are chosen
on this table. Each row's expert bytes are counted as the checkpoint would store them
(codes, float16 scales and zeros, shapes; :mod:`tuckerize.quant`, :mod:`tuckerize.quant_packed`)
against the bf16 dense experts.

Methods (``--methods``, comma-separated families):

* ``rtn``: round to nearest of the dense experts, asymmetric, groups along the input axis,
  min/max range (``rtn``) or the MSE-clipped range (``rtn-clip``);
* ``gptq``: GPTQ of the dense experts with the calibration statistics (gate/up: the routed
  hidden covariance, pooled; down: each expert's own down-input covariance), clipped grids;
* ``tucker``: calibrated Tucker (per-expert weights, ALS) at uniform ranks, factors and cores
  quantised by round to nearest with the Frobenius core refit (today's ``--factor-dtype``) or
  by GPTQ with the weighted refit (:mod:`tuckerize.decompose.factor_quant`);
* ``residual``: a GPTQ base at 2 or 3 bits plus a shared Tucker residual
  (:mod:`tuckerize.decompose.residual`), its factors and cores quantised by GPTQ.

    OMP_NUM_THREADS=2 python bench/frontier_methods.py --models qwen3,mixtral --methods rtn,gptq
    python bench/frontier_methods.py --table bench/out/frontier_methods.jsonl

Rows are appended to ``bench/out/frontier_methods.jsonl`` as they are made (``--out``).
Calibration statistics (128 windows of 256 tokens of ``tuckerize/demo/calibration.txt``) are
collected once per model into ``bench/out/frontier/<model>/``.
Our bench models, trained in float32 on a CPU, have no outlier features: they flatter scalar
quantisation; read every quality number here with that in mind.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
MODELS = {"qwen3": REPO / "tuckerize" / "demo" / "model", "mixtral": REPO / "tuckerize" / "demo" / "mixtral"}
OUT = REPO / "bench" / "out"
SEQLEN, SELECT, SAMPLES, KL_TOPK = 256, 50, 128, 256
PROJ = ("gate", "up", "down")


class Lab:
    """One model: its stacked experts, calibration statistics and the selection-split scorer."""

    def __init__(self, key: str, folder: Path | None = None):
        from transformers import AutoTokenizer

        from tuckerize.checkpoint import Checkpoint, load_config
        from tuckerize.arch import moe_spec
        from tuckerize.evaluate.runtimes import load_model
        from tuckerize.evaluate.scoring import score_baseline, token_windows
        from tuckerize.experts import stack_projection
        from tuckerize.progress import ensure
        from tuckerize.parallel import ParallelContext

        self.key, self.folder = key, Path(folder or MODELS[key])
        self.spec = moe_spec(load_config(self.folder))
        self.E, self.H, self.I = self.spec.shape
        self.layers = list(self.spec.moe_layers)
        ckpt = Checkpoint.open(self.folder)
        self.T = {(L, p): stack_projection(ckpt, self.spec, L, p) for L in self.layers for p in PROJ}
        ckpt.close()
        self.dense_bytes = 3 * self.E * self.H * self.I * 2 * len(self.layers)
        self.stats = self._stats()
        self.progress = ensure(None)
        tok = AutoTokenizer.from_pretrained(str(self.folder))
        ids = torch.tensor(tok((self.folder / "heldout.txt").read_text(), add_special_tokens=False,
                               verbose=False)["input_ids"])
        self.windows = token_windows(ids, SEQLEN, None)[:SELECT]
        self.model = load_model(str(self.folder), ParallelContext(), torch.device("cpu"), torch.float32)
        self.base = score_baseline(self.model, self.windows, KL_TOPK, torch.device("cpu"), self.progress)
        self.base_ppl = math.exp(float(self.base["nll"].mean()))

    def _stats(self):
        from tuckerize.calibration.collect import collect_statistics
        from tuckerize.calibration.store import STATS_NAME, CalibrationSettings, CalibrationStats
        from tuckerize.calibration.tokens import calibration_tokens, text_sha256
        from tuckerize.text import read_text

        where = OUT / "frontier" / self.key
        if (where / STATS_NAME).is_file():
            return CalibrationStats.load(where)
        text, label = read_text("demo", "calibration")
        settings = CalibrationSettings(source=label, samples=SAMPLES, seqlen=SEQLEN, text_sha256=text_sha256(text))
        tokens = calibration_tokens(text, self.folder, SAMPLES, SEQLEN)
        return collect_statistics(self.folder, settings, tokens, out=where, batch_size=16)

    def weights(self, L: int, p: str):
        """``(A, B, base_cov)``: the two-sided weights of the weighted Tucker objective
        (:func:`tuckerize.calibration.weights.expert_weights`) and the unridged covariance
        a dense base is quantised with (gate/up: routed hidden, pooled; down: per expert)."""
        from tuckerize.calibration.weights import WhitenOptions, expert_weights

        st = self.stats.layers[L]
        A, B = expert_weights(st, p, self.T[(L, "down")], WhitenOptions())
        cov = st["inter_expert"] if p == "down" else st["hidden_routed"]
        return A, B, cov.to(torch.float64)

    def score(self, recon: dict) -> dict:
        """Selection-split scores with every projection's experts replaced by ``recon[(L, p)]``."""
        from tuckerize.evaluate.scoring import score_tucker

        blocks = self.model.moe_blocks
        saved = {}
        for (L, p), t in recon.items():
            buf = getattr(blocks[L].experts, p)
            saved[(L, p)] = buf.clone()
            buf.copy_(t.to(buf.dtype))
        try:
            r = score_tucker(self.model, self.windows, self.base, torch.device("cpu"), 0, self.progress)
        finally:
            for (L, p), t in saved.items():
                getattr(blocks[L].experts, p).copy_(t)
        return {"ppl": math.exp(float(r["nll"].mean())), "kl": float(r["kl"].mean()), "top1": float(r["agree"].mean())}


# ----------------------------------------------------------------------------- methods
def grid_of(spec: str):
    """``int4`` (symmetric, the factor codec), ``a3`` / ``a2`` (asymmetric, packed), ``g``-suffixed
    group sizes (``int4g64``); None for ``bf16``."""
    from tuckerize.quant_grid import Grid

    if spec == "bf16":
        return None
    group = 128
    if "g" in spec[1:]:
        spec, group = spec.split("g")[0], int(spec.split("g")[1])
    if spec.startswith("int"):
        return Grid(bits=int(spec[3:]), group=group, symmetric=True)
    return Grid(bits=int(spec[1:]), group=group, symmetric=False)


def grid_bytes(shape, grid) -> int:
    from tuckerize.quant import tensor_bytes
    from tuckerize.quant_packed import packed_bytes

    if grid is None:
        return tensor_bytes(shape, "bf16")
    if grid.symmetric and grid.bits in (4, 8):
        return tensor_bytes(shape, f"int{grid.bits}", grid.group)
    return packed_bytes(shape, grid.bits, grid.group)


def base_only(lab: Lab, L: int, p: str, kind: str, bits: int, group: int):
    from tuckerize.decompose.gptq import gptq, rtn
    from tuckerize.quant_grid import Grid
    from tuckerize.decompose.residual import base_orientation
    from tuckerize.quant_packed import packed_bytes

    T = lab.T[(L, p)].double()
    to_s, from_s = base_orientation("I" if p == "down" else "H")
    W = to_s(T).contiguous()
    grid = Grid(bits=bits, group=group, symmetric=False, clip=kind != "rtn")
    if kind == "gptq":
        _, _, cov = lab.weights(L, p)
        q = gptq(W, cov, grid)
    else:
        q = rtn(W, grid)
    return from_s(q.weight).float(), packed_bytes(W.shape, bits, group)


def tucker(lab: Lab, L: int, p: str, rank, dtypes: dict, method: str):
    """Calibrated Tucker at ``rank`` (r_E = E), factors stored as ``dtypes`` (``{U_H, U_I, core}``
    grid specs) by ``method``: ``rtn-frobenius`` (today's --factor-dtype), ``rtn`` or ``gptq``
    (weighted refit)."""
    from tuckerize.calibration.weights import WhitenOptions, mode_weights
    from tuckerize.decompose import TuckerTensor
    from tuckerize.decompose.expert_weighted import expert_weighted_tucker
    from tuckerize.decompose.factor_quant import quantise_tucker
    from tuckerize.decompose.whiten import whitened_tucker
    from tuckerize.quant import fake_quantize, refit_core

    T = lab.T[(L, p)]
    A, B, _ = lab.weights(L, p)
    pooled = mode_weights(lab.stats.layers[L], p, WhitenOptions())
    init = whitened_tucker(T, (lab.E, rank[1], rank[2]), [None, *pooled[1:]])
    res = expert_weighted_tucker(T, (lab.E, rank[1], rank[2]), A, B, init=init, iters=3)
    grids = {f: grid_of(dtypes[f]) for f in ("U_H", "U_I", "core")}
    nbytes = grid_bytes((lab.E, lab.E), None) + sum(
        grid_bytes(s, grids[f]) for f, s in (("U_H", (lab.H, rank[1])), ("U_I", (lab.I, rank[2])),
                                             ("core", (lab.E, rank[1], rank[2]))))
    if method == "rtn-frobenius":
        f = [res.factors[0].float()] + [fake_quantize(u.float(), dtypes[k], 128) if dtypes[k] != "bf16" else
                                        u.float() for u, k in zip(res.factors[1:], ("U_H", "U_I"))]
        core = refit_core(res.core.float(), dict(zip(("U_E", "U_H", "U_I"), res.factors)),
                          dict(zip(("U_E", "U_H", "U_I"), f)))
        core = fake_quantize(core, dtypes["core"], 128) if dtypes["core"] != "bf16" else core
        return TuckerTensor(core=core, factors=f).to_tensor().float(), nbytes
    q = quantise_tucker(T, res.factors, res.core, A, B, grids, side="I" if p == "down" else "H", method=method)
    f = q.factors
    return TuckerTensor(core=f["core"], factors=[f["U_E"], f["U_H"], f["U_I"]]).to_tensor().float(), nbytes


def residual(lab: Lab, L: int, p: str, bits: int, group: int, rank, dtypes: dict, rounds: int, init: str,
             factor_method: str = "gptq"):
    from tuckerize.quant_grid import Grid
    from tuckerize.decompose.residual import fit_quantised
    from tuckerize.quant_packed import packed_bytes

    T = lab.T[(L, p)]
    A, B, cov = lab.weights(L, p)
    grids = {f: grid_of(dtypes[f]) for f in ("U_H", "U_I", "core")}
    side = "I" if p == "down" else "H"
    out = fit_quantised(T, (lab.E, rank[1], rank[2]), A, B, Grid(bits=bits, group=group), grids, side=side,
                        rounds=rounds, init=init, base_cov=cov, factor_method=factor_method)
    base_shape = (lab.E, lab.H, lab.I) if side == "I" else (lab.E, lab.I, lab.H)  # [E, out, in]
    nbytes = packed_bytes(base_shape, bits, group) + grid_bytes((lab.E, lab.E), None) + sum(
        grid_bytes(s, grids[f]) for f, s in (("U_H", (lab.H, rank[1])), ("U_I", (lab.I, rank[2])),
                                             ("core", (lab.E, rank[1], rank[2]))))
    return out.reconstruction().float(), nbytes


class Allocated:
    """``--bytes`` as the library does it, one layer at a time in memory: every projection's
    candidate forms (:func:`tuckerize.compress.forms.projection_options`), one per projection
    chosen for the budget (:func:`tuckerize.allocate_bytes.choose`), each realised."""

    def __init__(self, lab: Lab, method, alloc_damp: float = 10.0):
        from tuckerize.calibration.weights import WhitenOptions, mode_weights
        from tuckerize.compress.forms import projection_options

        self.lab, self.method = lab, method
        metric = WhitenOptions(method="pooled", damp=alloc_damp)
        self.options = {(L, p): projection_options(lab.T[(L, p)], lab.stats.layers[L], p, method,
                                                   mode_weights(lab.stats.layers[L], p, metric))
                        for L in lab.layers for p in PROJ}
        self.choice = None

    def plan(self, fraction: float):
        from tuckerize.allocate_bytes import choose

        self.choice = choose(self.options, int(fraction * self.lab.dense_bytes))
        return self.choice

    def __call__(self, L: int, p: str):
        from tuckerize.calibration.weights import WhitenOptions, expert_weights, mode_weights
        from tuckerize.compress.forms import realise
        from tuckerize.decompose import TuckerTensor
        from tuckerize.decompose.expert_weighted import expert_weighted_tucker
        from tuckerize.decompose.whiten import whitened_tucker
        from tuckerize.quant import decode

        lab, opt = self.lab, self.choice.options[(L, p)]
        st = lab.stats.layers[L]
        A, B = expert_weights(st, p, lab.T[(L, "down")], WhitenOptions())
        pooled = mode_weights(st, p, WhitenOptions())

        def dec(T, ranks):
            init = whitened_tucker(T, ranks, [None, *pooled[1:]])
            return expert_weighted_tucker(T, ranks, A, B, init=init, iters=3)

        names = {f: f"x.{f}" for f in ("U_E", "U_H", "U_I", "core")}
        tensors, record = realise(lab.T[(L, p)], opt, proj=p, layer_stats=st, A=A, B=B, decompose_tucker=dec,
                                  names=names, base_name="x.base", method=self.method)
        recon = 0
        if opt.base is not None:
            b = decode(tensors, "x.base")
            recon = b if p == "down" else b.transpose(1, 2)
        if opt.ranks is not None:
            f = {k: decode(tensors, n) for k, n in names.items()}
            recon = recon + TuckerTensor(core=f["core"], factors=[f["U_E"], f["U_H"], f["U_I"]]).to_tensor()
        return recon.float(), record["bytes"]


BYTES_BUDGETS = (0.08, 0.10, 0.12, 0.14, 0.16, 0.18, 0.20, 0.22, 0.25, 0.28, 0.30)
BYTES_VARIANTS = {
    "all": {},
    "base": {"forms": ("base",)},
    "base+residual": {"forms": ("base", "base+tucker")},
    "tucker": {"forms": ("tucker",)},
    "all+1bit": {"base_bits": (1, 2, 3, 4)},
    "all+1bit+int3core": {"base_bits": (1, 2, 3, 4), "tucker_storages": ("int4", "int4,core=int3", "int8,core=int4")},
    "base+1bit": {"forms": ("base",), "base_bits": (1, 2, 3, 4)},
    "all@tucker-init": {"residual_init": "tucker"},
    "all+1bit@d1": {"base_bits": (1, 2, 3, 4), "alloc_damp": 1.0},
    "all+1bit@d0.1": {"base_bits": (1, 2, 3, 4), "alloc_damp": 0.1},
    "all+1bit@d0.01": {"base_bits": (1, 2, 3, 4), "alloc_damp": 0.01},
}


def run_bytes(lab: Lab, variants, budgets, out: Path, log) -> None:
    from tuckerize.compress.forms import BytesMethod

    for v in variants:
        t = time.time()
        kw = dict(BYTES_VARIANTS[v])
        alloc = Allocated(lab, BytesMethod(**{k: x for k, x in kw.items() if k != "alloc_damp"}),
                          kw.get("alloc_damp", 10.0))
        log(f"[{lab.key}] bytes {v}: options in {time.time() - t:.0f} s")
        for fraction in budgets:
            try:
                choice = alloc.plan(fraction)
            except Exception as exc:  # a budget below the smallest form of this variant
                log(f"[{lab.key}] bytes {v} {fraction}: {exc}")
                continue
            forms = {}
            for o in choice.options.values():
                forms[o.describe()] = forms.get(o.describe(), 0) + 1
            row = run_method(lab, f"bytes {fraction:.2f} {v}", alloc, log)
            row.update(budget=fraction, variant=v, estimated_error=choice.estimated_error, forms=forms)
            with open(out, "a") as fh:
                fh.write(json.dumps(row) + "\n")


def run_product(lab: Lab, budgets, out: Path, log) -> None:
    """``decompose_checkpoint(bytes_budget=B)`` (the product, with this model's statistics) at
    every budget, each checkpoint loaded by the native runtime and scored on the selection split."""
    import shutil

    from tuckerize.compress import decompose_checkpoint
    from tuckerize.evaluate.runtimes import load_model
    from tuckerize.evaluate.scoring import score_tucker
    from tuckerize.parallel import ParallelContext

    from tuckerize.calibration.store import STATS_META, STATS_NAME

    work = OUT / "frontier" / lab.key
    stats = work / "product_stats"  # the product's own statistics (same text and windows), collected once
    for fraction in budgets:
        folder = work / f"bytes{fraction:g}"
        t = time.time()
        where = {"stats": stats} if (stats / STATS_NAME).is_file() else {"calibration": "demo", "samples": SAMPLES,
                                                                         "seqlen": SEQLEN}
        manifest = decompose_checkpoint(str(lab.folder), folder, bytes_budget=fraction, overwrite=True, **where)
        if "calibration" in where:
            stats.mkdir(parents=True, exist_ok=True)
            for name in (STATS_NAME, STATS_META):
                shutil.copyfile(folder / name, stats / name)
        fit_s = time.time() - t
        model = load_model(str(folder), ParallelContext(), torch.device("cpu"), torch.float32)
        r = score_tucker(model, lab.windows, lab.base, torch.device("cpu"), 0, lab.progress)
        b = manifest["bytes"]
        forms: dict = {}
        for p in b["projections"]:
            key = (f"int{p['base']['bits']} g{p['base']['group']} base" if p["base"] else "") + \
                  (" + " if p["base"] and p["ranks"] else "") + (f"Tucker {p['storage']}" if p["ranks"] else "")
            forms[key] = forms.get(key, 0) + 1
        row = {"model": lab.key, "method": f"decompose --bytes {fraction:g}", "budget": fraction,
               "bytes": b["experts_stored"], "bytes_ratio": b["ratio_to_bf16_dense"], "original_ppl": lab.base_ppl,
               "ppl": math.exp(float(r["nll"].mean())), "kl": float(r["kl"].mean()),
               "top1": float(r["agree"].mean()), "fit_seconds": round(fit_s, 1), "split": "select", "forms": forms,
               "variant": "product"}
        log(f"[{lab.key}] {row['method']}: {row['bytes_ratio']:.2%} ppl {row['ppl']:.3f} "
            f"({row['ppl'] / lab.base_ppl - 1:+.2%}) kl {row['kl']:.4f} top1 {row['top1']:.3f} (fit {fit_s:.0f} s) {forms}")
        with open(out, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        shutil.rmtree(folder)


def run_method(lab: Lab, name: str, fn, log) -> dict:
    t = time.time()
    recon, nbytes = {}, 0
    for L in lab.layers:
        for p in PROJ:
            recon[(L, p)], b = fn(L, p)
            nbytes += b
    fit_s = time.time() - t
    s = lab.score(recon)
    row = {"model": lab.key, "method": name, "bytes": nbytes, "bytes_ratio": nbytes / lab.dense_bytes,
           "original_ppl": lab.base_ppl, **s, "fit_seconds": round(fit_s, 1), "split": "select"}
    log(f"[{lab.key}] {name}: {row['bytes_ratio']:.2%} ppl {s['ppl']:.3f} ({s['ppl'] / lab.base_ppl - 1:+.2%}) "
        f"kl {s['kl']:.4f} top1 {s['top1']:.3f} (fit {fit_s:.0f} s)")
    return row


def _factors(spec: str) -> dict:
    """``"int8,core=a3"`` -> ``{U_H: int8, U_I: int8, core: a3}``."""
    parts = spec.split(",")
    d = {"U_H": parts[0], "U_I": parts[0], "core": parts[0]}
    for part in parts[1:]:
        k, v = part.split("=")
        d[k] = v
    return d


#: The settings of each family: (bits, group) of a base, Tucker ranks (r_H, r_I), factor storage.
FAMILIES = {
    "rtn": [("rtn", b, g) for b in (2, 3, 4) for g in (128, 64, 32)],
    "rtn-clip": [("rtn-clip", b, g) for b in (2, 3) for g in (128, 64, 32)],
    "gptq": [("gptq", b, g) for b in (2, 3, 4) for g in (128, 64, 32)],
    "gptq1": [("gptq", 1, g) for g in (128, 64, 32)],
    "tucker": [((rH, rI), fd, m) for rH, rI in ((64, 32), (96, 48)) for fd in ("int8,core=int4", "int4")
               for m in ("rtn-frobenius", "rtn", "gptq")],
    "tucker-lowbit": [((rH, rI), fd, "gptq") for rH, rI in ((96, 48), (112, 56), (128, 64))
                      for fd in ("int8,core=a3", "int8,core=a2")],
    "residual": [(b, g, r, "int8,core=int4", init) for b, g in ((2, 128), (2, 64)) for r in (8, 16)
                 for init in ("base", "tucker")],
    "residual2": [(3, 128, 8, "int8,core=int4", "tucker"), (3, 128, 16, "int8,core=int4", "tucker"),
                  (2, 128, 32, "int8,core=int4", "tucker"), (2, 128, 16, "int4", "tucker"),
                  (2, 128, 16, "int8,core=a3", "tucker"), (2, 32, 16, "int8,core=int4", "tucker")],
    "residual3": [(2, 128, 16, "int4", init, rounds, fm) for init in ("base", "tucker") for rounds in (1, 2, 4)
                  for fm in ("gptq", "rtn") if fm == "gptq" or rounds == 2],
    "residual1": [(1, 128, r, "int4", "tucker") for r in (8, 16, 32)],
}


def plans(family: str, lab: Lab):
    """(name, fn(L, p)) of every setting of ``family`` (:data:`FAMILIES`)."""
    E = lab.E
    if family not in FAMILIES:
        raise SystemExit(f"unknown method family {family}; one of {', '.join(FAMILIES)}")
    for setting in FAMILIES[family]:
        if family in ("rtn", "rtn-clip") or family.startswith("gptq"):
            kind, bits, group = setting
            kind = "gptq" if kind.startswith("gptq") else kind
            yield (f"{kind} int{bits} g{group}", lambda L, p, k=kind, b=bits, g=group: base_only(lab, L, p, k, b, g))
        elif family.startswith("tucker"):
            (rH, rI), fd, method = setting
            yield (f"tucker ({E},{rH},{rI}) {fd} {method}",
                   lambda L, p, r=(E, rH, rI), d=_factors(fd), m=method: tucker(lab, L, p, r, d, m))
        else:
            bits, group, r, fd, init, rounds, fm = (*setting, 2, "gptq")[:7] if len(setting) == 5 else setting
            extra = "" if (rounds, fm) == (2, "gptq") else f" rounds {rounds} factors {fm}"
            yield (f"residual a{bits} g{group} + ({E},{r},{r}) {fd} init {init}{extra}",
                   lambda L, p, b=bits, g=group, r=r, d=_factors(fd), i=init, n=rounds, m=fm:
                   residual(lab, L, p, b, g, (E, r, r), d, n, i, m))


def table(path: Path) -> None:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    for model in sorted({r["model"] for r in rows}):
        print(f"\n{model} (selection split; original {rows[0]['original_ppl']:.3f})\n")
        print("| method | expert bytes (of bf16) | perplexity | change | KL | top-1 |")
        print("|---|---:|---:|---:|---:|---:|")
        for r in sorted((r for r in rows if r["model"] == model), key=lambda r: r["bytes_ratio"]):
            print(f"| {r['method']} | {r['bytes_ratio']:.2%} | {r['ppl']:.3f} | {r['ppl'] / r['original_ppl'] - 1:+.2%} "
                  f"| {r['kl']:.4f} | {r['top1']:.3f} |")


def _load(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _cell(r: dict | None) -> str:
    if r is None:
        return " | "
    return f"{r['ppl']:.2f} ({r['ppl'] / r['original_ppl'] - 1:+.1%}) | {r['kl']:.4f}"


def markdown(results: Path) -> None:
    """BENCHMARKS.md's tables of the frontier section, from the result files in ``results``."""
    methods = _load(results / "frontier_methods.jsonl")
    by = {(r["model"], r["method"]): r for r in methods}
    names = sorted({r["method"] for r in methods}, key=lambda n: (min(r["bytes_ratio"] for r in methods
                                                                      if r["method"] == n), n))
    print("| method | expert bytes (of bf16) | qwen3 perplexity | qwen3 KL | mixtral perplexity | mixtral KL |")
    print("|---|---:|---:|---:|---:|---:|")
    for n in names:
        rq, rm = by.get(("qwen3", n)), by.get(("mixtral", n))
        print(f"| {n} | {(rq or rm)['bytes_ratio']:.2%} | {_cell(rq)} | {_cell(rm)} |")
    alloc = _load(results / "frontier_bytes.jsonl")
    shown = ("base", "base+residual", "all", "all+1bit", "all+1bit+int3core", "all@tucker-init", "all+1bit@d1",
             "all+1bit@d0.1")
    for model in ("qwen3", "mixtral"):
        variants = [v for v in shown if any(r["variant"] == v and r["model"] == model for r in alloc)]
        budgets = sorted({r["budget"] for r in alloc if r["model"] == model})
        get = {(r["variant"], r["budget"]): r for r in alloc if r["model"] == model}
        print(f"\n{model}: KL (perplexity) of the allocator's variants per budget\n")
        print("| budget | " + " | ".join(variants) + " |")
        print("|---:|" + "---:|" * len(variants))
        for b in budgets:
            cells = [f"{get[(v, b)]['kl']:.4f} ({get[(v, b)]['ppl']:.2f})" if (v, b) in get else "-" for v in variants]
            print(f"| {b:.0%} | " + " | ".join(cells) + " |")
    print("\n| model | --bytes | expert bytes | perplexity | KL | top-1 | forms chosen (12 projections) |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for r in _load(results / "frontier_product.jsonl"):
        forms = ", ".join(f"{n} {k}" for k, n in sorted(r["forms"].items(), key=lambda kv: -kv[1]))
        print(f"| {r['model']} | {r['budget']:g} | {r['bytes_ratio']:.2%} | {r['ppl']:.2f} "
              f"({r['ppl'] / r['original_ppl'] - 1:+.2%}) | {r['kl']:.4f} | {r['top1']:.3f} | {forms} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="qwen3,mixtral")
    ap.add_argument("--methods", default="rtn,rtn-clip,gptq,tucker,residual")
    ap.add_argument("--only", default=None, help="only settings whose name contains this")
    ap.add_argument("--out", type=Path, default=OUT / "frontier_methods.jsonl")
    ap.add_argument("--table", type=Path, default=None, help="print the table of a result file and exit")
    ap.add_argument("--markdown", type=Path, default=None,
                    help="print BENCHMARKS.md's tables from the result files in this folder (bench/results) and exit")
    ap.add_argument("--bytes", default=None, help="allocator variants to run (all, base, base+residual, tucker)")
    ap.add_argument("--budgets", default=",".join(map(str, BYTES_BUDGETS)))
    ap.add_argument("--product", action="store_true",
                    help="run `decompose --bytes B` (the library call) at every budget and score the checkpoints")
    args = ap.parse_args()
    if args.table is not None:
        table(args.table)
        return
    if args.markdown is not None:
        markdown(args.markdown)
        return
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, torch.get_num_threads()))

    def log(msg: str) -> None:
        print(msg, flush=True)

    for key in args.models.split(","):
        t = time.time()
        lab = Lab(key)
        log(f"[{key}] loaded, statistics and baseline in {time.time() - t:.0f} s; original ppl {lab.base_ppl:.3f}")
        budgets = [float(b) for b in args.budgets.split(",")]
        if args.product:
            run_product(lab, budgets, args.out, log)
            continue
        if args.bytes:
            run_bytes(lab, args.bytes.split(","), budgets, args.out, log)
            continue
        for family in args.methods.split(","):
            for name, fn in plans(family, lab):
                if args.only and args.only not in name:
                    continue
                row = run_method(lab, name, fn, log)
                with open(args.out, "a") as fh:
                    fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()

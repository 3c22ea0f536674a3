"""Tucker against what users pick instead, at equal expert bytes (issue 11).

For each demo model (tuckerize/demo/model = Qwen3-MoE, tuckerize/demo/mixtral = Mixtral) and
each budget of 25%, 50%, 75% of the routed experts' BYTES removed (bf16 dense experts = 100%),
every row is at equal or fewer expert bytes than its budget:

* calibrated Tucker, bf16 factors (``decompose_checkpoint(calibration="demo", ratio=...,
  factor_dtype="bf16")``, the ratio chosen from the byte budget);
* calibrated Tucker with quantised factors (``factor_dtype`` chosen on the selection split
  among a few per-factor settings, the ratio again from the byte budget);
* round-to-nearest int4 and int3 of the dense experts, asymmetric, group 128 along the input
  axis, ``group = min(128, in_features)`` (64 for down on the demo models), float16 scale
  and zero per group;
* expert pruning by routing frequency and by REAP saliency (mean over the tokens routed to
  an expert of router weight x ||expert output||), both on the calibration text;
* frequency-weighted expert merging within clusters (average-linkage clustering of the
  experts' outputs on calibration tokens, no neuron alignment);
* per-expert truncated SVD, plain and whitened (SVD-LLM: Cholesky factor of the expert's
  routed input covariance, float64, a ridge chosen on the selection split).

Baselines are written as modified dense checkpoints in the demo's own format (pruning drops
experts and router rows; merging writes the merged weights under every member's name, which
computes exactly what a router remapped to the merged expert computes; RTN and SVD write
the dequantised / low-rank-reconstructed weights) and every row is scored by the product's
evaluation code (``tuckerize.evaluate.runtimes.load_model`` / ``scoring.score_baseline`` / ``score_tucker``:
native runtime, float32, perplexity, KL(original || row) on the original's top-256 plus a
rest bucket, top-1 agreement). Bytes are counted as the row would store them.

Text: the calibration text is ``tuckerize/demo/calibration.txt`` (cut from the training plays);
each demo folder's ``heldout.txt`` (plays never trained on) is tokenised whole and cut into
199 windows of 256 tokens: windows 0-49 are the SELECTION split (every setting chosen here is
chosen on it: Tucker factor dtypes, the whitened-SVD ridge), windows 50-198 the REPORT split
(the tables). No setting is chosen on the report split.

    python bench/compare.py                  # both models, writes bench/out/compare.json, compare_*.png
    python bench/compare.py --models qwen3   # one model
    python bench/compare.py --only gptq --gptq-python VENV/bin/python   # GPTQ rows (llmcompressor)
    python bench/compare.py --only awq --awq-python VENV/bin/python     # AWQ rows (llmcompressor)
    python bench/compare.py --only sensitivity                          # per-factor int4 sensitivity
    python bench/compare.py --report FILE.json ...                      # merge runs: tables, plots
    python bench/compare.py --model-folder moe64=/work/moe64 ...        # another model (scripts/train_demo.py)

``--model-folder KEY=FOLDER`` (repeatable) adds a model trained by scripts/train_demo.py with the
default held-out plays (its ``heldout.txt`` is then the demos' and the calibration text stays
disjoint from it); ``--models`` defaults to the added keys. The folder is recorded in the result
file, so ``--report`` finds it again.

A few minutes of CPU per model alone; about an hour of wall time per model on the 2 cores
shared with six other jobs (use ``--budgets`` to split a run into processes).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
MODELS = {"qwen3": REPO / "tuckerize" / "demo" / "model", "mixtral": REPO / "tuckerize" / "demo" / "mixtral"}
OUT = REPO / "bench" / "out"
SEQLEN = 256
SELECT = 50  # windows [0, SELECT) choose settings; the rest are reported
KL_TOPK = 256
REMOVED = (0.25, 0.50, 0.75)
SAMPLES = 128  # calibration windows of SEQLEN tokens (as bench/calibration.py)
FEAT_TOKENS = 512  # calibration tokens per layer whose outputs describe an expert for clustering
TUCKER_DTYPES = ("int8,core=int4", "int4")
SVD_RIDGES = (1e-3, 1e-1)


# ----------------------------------------------------------------------------- scoring
class Scorer:
    """The product's scoring functions on the selection and report splits of heldout.txt."""

    def __init__(self, folder: Path):
        from transformers import AutoTokenizer

        from tuckerize.evaluate.runtimes import load_model
        from tuckerize.evaluate.scoring import score_baseline, token_windows
        from tuckerize.progress import ensure
        from tuckerize.parallel import ParallelContext

        self.folder = folder
        self.parallel, self.device, self.progress = ParallelContext.current(), torch.device("cpu"), ensure(None)
        tok = AutoTokenizer.from_pretrained(str(folder))
        ids = torch.tensor(tok((folder / "heldout.txt").read_text(), add_special_tokens=False, verbose=False)["input_ids"])
        windows = token_windows(ids, SEQLEN, None)
        self.splits = {"select": windows[:SELECT], "report": windows[SELECT:]}
        model = load_model(str(folder), self.parallel, self.device, torch.float32)
        self.base = {k: score_baseline(model, w, KL_TOPK, self.device, self.progress) for k, w in self.splits.items()}

    def baseline(self, split: str) -> dict:
        return {"ppl": math.exp(float(self.base[split]["nll"].mean())), "kl": 0.0, "top1": 1.0}

    def __call__(self, folder: Path, split: str = "report") -> dict:
        from tuckerize.evaluate.runtimes import load_model
        from tuckerize.evaluate.scoring import score_tucker

        model = load_model(str(folder), self.parallel, self.device, torch.float32)
        r = score_tucker(model, self.splits[split], self.base[split], self.device, 0, self.progress)
        return {"ppl": math.exp(float(r["nll"].mean())), "kl": float(r["kl"].mean()), "top1": float(r["agree"].mean())}


# ----------------------------------------------------------------------------- calibration statistics
def _calibration_api():
    """(LayerwiseRunner, calibration_tokens, read_calibration_text) where the package keeps them."""
    try:  # the calibration package: runner in runtime.layerwise, texts in tuckerize.text
        from tuckerize.calibration.tokens import calibration_tokens
        from tuckerize.runtime.layerwise import LayerwiseRunner
        from tuckerize.text import read_text

        return LayerwiseRunner, calibration_tokens, lambda spec: read_text(spec, "calibration")
    except ImportError:  # the single module it replaced
        from tuckerize.calibrate import LayerwiseRunner, calibration_tokens, read_calibration_text

        return LayerwiseRunner, calibration_tokens, read_calibration_text


class StatsExperts(torch.nn.Module):
    """Dense routed experts that record what the baselines need, per expert: routed pairs,
    the REAP sum of router weight x ||output||, the routed input covariances of gate/up
    (``[H, H]``) and of down (``[I, I]``) in float64, and every expert's output on the first
    ``FEAT_TOKENS`` tokens (for clustering)."""

    def __init__(self, w: dict, act: str):
        super().__init__()
        from tuckerize.parallel import activation

        self.w = {p: t.float() for p, t in w.items()}
        E, H, I = self.w["gate"].shape
        self.num_experts, self.act = E, activation(act)
        self.freq = torch.zeros(E, dtype=torch.float64)
        self.reap = torch.zeros(E, dtype=torch.float64)
        self.cov_h = torch.zeros(E, H, H, dtype=torch.float64)
        self.cov_a = torch.zeros(E, I, I, dtype=torch.float64)
        self.feat: list[torch.Tensor] = []
        self.feat_left = FEAT_TOKENS

    def _expert(self, e: int, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.act(h @ self.w["gate"][e]) * (h @ self.w["up"][e])
        return a, a @ self.w["down"][e].T

    def partial(self, x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        x = x.float()
        out = torch.zeros_like(x)
        if self.feat_left > 0:
            xs = x[: self.feat_left]
            self.feat.append(torch.stack([self._expert(e, xs)[1] for e in range(self.num_experts)]))
            self.feat_left -= xs.shape[0]
        for e in range(self.num_experts):
            t, k = (top_k_index == e).nonzero(as_tuple=True)
            if t.numel() == 0:
                continue
            h, we = x[t], top_k_weights[t, k].float()
            a, y = self._expert(e, h)
            self.freq[e] += t.numel()
            self.reap[e] += float((we * y.norm(dim=-1)).sum())
            self.cov_h[e] += h.double().T @ h.double()
            self.cov_a[e] += a.double().T @ a.double()
            out.index_add_(0, t, y * we[:, None])
        return out

    def finish(self, s: torch.Tensor) -> torch.Tensor:
        return s


def collect_stats(folder: Path) -> dict[int, dict]:
    from tuckerize.runtime.loader import TensorSource

    LayerwiseRunner, calibration_tokens, read_calibration_text = _calibration_api()
    source = TensorSource.open(folder)
    text = read_calibration_text("demo")[0]
    tokens = calibration_tokens(text, folder, SAMPLES, SEQLEN)
    runner = LayerwiseRunner(source, tokens, batch_size=16)
    stats = {}
    for layer in range(int(source.config["num_hidden_layers"])):
        if layer in source.spec.moe_layers:
            ex = StatsExperts(runner.stacked_experts(layer), source.config.get("hidden_act", "silu"))
            runner.run(layer, experts=ex)
            stats[layer] = {"freq": ex.freq, "reap": ex.reap / ex.freq.clamp_min(1), "cov_h": ex.cov_h,
                            "cov_a": ex.cov_a, "feat": torch.cat(ex.feat, 1)[:, :FEAT_TOKENS]}
        else:
            runner.run(layer)
    return stats


# ----------------------------------------------------------------------------- dense checkpoints
class Dense:
    """The source checkpoint's tensors, and writing a modified copy in the same format."""

    def __init__(self, folder: Path):
        from safetensors.torch import load_file

        from tuckerize.arch import moe_spec
        from tuckerize.checkpoint import load_config

        self.folder = folder
        self.config = load_config(folder)
        self.spec = moe_spec(self.config)
        self.tensors = load_file(str(folder / "model.safetensors"))
        E, H, I = self.spec.shape
        self.E, self.H, self.I, self.K = E, H, I, self.spec.top_k
        self.layers = list(self.spec.moe_layers)
        self.dense_bytes = 3 * E * H * I * 2 * len(self.layers)
        self.dense_macs = len(self.layers) * self.K * 3 * H * I

    def name(self, layer: int, proj: str, e: int) -> str:
        return self.spec.arch.expert_name(layer, proj, e)

    def write(self, out: Path, tensors: dict, config: dict | None = None) -> Path:
        from safetensors.torch import save_file

        from tuckerize.checkpoint import SIDE_FILES

        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
        (out / "config.json").write_text(json.dumps(config or self.config, indent=2))
        for f in SIDE_FILES:
            if (self.folder / f).is_file():
                shutil.copyfile(self.folder / f, out / f)
        return out


def rtn(d: Dense, bits: int, group: int = 128) -> tuple[dict, int]:
    """Asymmetric round-to-nearest, group along the input axis (min(group, in_features)),
    float16 scale and zero per group. Returns (tensors, bytes)."""
    from tuckerize.quant import group_view

    t = dict(d.tensors)
    nbytes = 0
    qmax = 2**bits - 1
    for layer in d.layers:
        for p in ("gate", "up", "down"):
            for e in range(d.E):
                n = d.name(layer, p, e)
                w = t[n].float()  # [out, in]
                rows, cols = w.shape
                gv, g = group_view(w, group)
                lo, hi = gv.amin(-1, keepdim=True), gv.amax(-1, keepdim=True)
                scale = ((hi - lo) / qmax).clamp_min(1e-12).half().float()
                zero = torch.round(-lo / scale).clamp(0, qmax).half().float()
                q = torch.clamp(torch.round(gv / scale) + zero, 0, qmax)
                t[n] = ((q - zero) * scale).view(rows, -1)[:, :cols].to(t[n].dtype).contiguous()
                nbytes += math.ceil(rows * cols * bits / 8) + rows * math.ceil(cols / g) * 4
    return t, nbytes


def prune(d: Dense, keep: int, score: dict[int, torch.Tensor]) -> tuple[dict, dict, int]:
    """Keep the ``keep`` experts of each layer with the highest score; router rows dropped."""
    t = {k: v for k, v in d.tensors.items()}
    config = dict(d.config)
    for layer in d.layers:
        kept = sorted(torch.argsort(score[layer], descending=True)[:keep].tolist())
        for p in ("gate", "up", "down"):
            old = {e: t.pop(d.name(layer, p, e)) for e in range(d.E)}
            for new, e in enumerate(kept):
                t[d.name(layer, p, new)] = old[e]
        r = d.spec.arch.router_name(layer)
        t[r] = t[r][kept].contiguous()
    for key in ("num_experts", "num_local_experts"):
        if key in config:
            config[key] = keep
    return t, config, keep * 3 * d.H * d.I * 2 * len(d.layers)


def clusters(feat: torch.Tensor, n: int) -> list[list[int]]:
    """Average-linkage agglomerative clustering of experts by their outputs ``feat [E, T, H]``."""
    f = feat.reshape(feat.shape[0], -1).double()
    dist = torch.cdist(f, f)
    groups = [[e] for e in range(f.shape[0])]
    while len(groups) > n:
        best = None
        for i in range(len(groups)):
            for j in range(i + 1, len(groups)):
                dd = float(dist[groups[i]][:, groups[j]].mean())
                if best is None or dd < best[0]:
                    best = (dd, i, j)
        _, i, j = best
        groups[i] += groups.pop(j)
    return groups


def merge(d: Dense, n: int, stats: dict) -> tuple[dict, int]:
    """Frequency-weighted average of each cluster's experts, written under every member's name."""
    t = dict(d.tensors)
    for layer in d.layers:
        freq = stats[layer]["freq"]
        for group in clusters(stats[layer]["feat"], n):
            w = freq[group] / freq[group].sum().clamp_min(1)
            for p in ("gate", "up", "down"):
                merged = sum(float(w[i]) * d.tensors[d.name(layer, p, e)].float() for i, e in enumerate(group))
                for e in group:
                    t[d.name(layer, p, e)] = merged.to(d.tensors[d.name(layer, p, e)].dtype).clone()
    return t, n * 3 * d.H * d.I * 2 * len(d.layers)


def svd(d: Dense, rank: int, stats: dict | None, ridge: float = 1e-2) -> tuple[dict, int]:
    """Per-expert truncated SVD of each [out, in] matrix; with ``stats``, whitened by the
    Cholesky factor of the expert's routed input covariance (+ ridge x mean eigenvalue)."""
    t = dict(d.tensors)
    for layer in d.layers:
        for p in ("gate", "up", "down"):
            for e in range(d.E):
                n = d.name(layer, p, e)
                w = t[n].double()
                if stats is None:
                    u, s, vh = torch.linalg.svd(w, full_matrices=False)
                    approx = (u[:, :rank] * s[:rank]) @ vh[:rank]
                else:
                    c = stats[layer]["cov_a" if p == "down" else "cov_h"][e]
                    c = c + ridge * max(float(c.diagonal().mean()), 1e-12) * torch.eye(c.shape[0], dtype=c.dtype)
                    chol = torch.linalg.cholesky(c)  # C = L L^T; ||W X^T|| = ||W L||
                    u, s, vh = torch.linalg.svd(w @ chol, full_matrices=False)
                    approx = torch.linalg.solve_triangular(chol.T, ((u[:, :rank] * s[:rank]) @ vh[:rank]).T,
                                                           upper=True).T  # (U S V^T) L^{-1}
                t[n] = approx.to(t[n].dtype).contiguous()
    return t, d.E * 3 * rank * (d.H + d.I) * 2 * len(d.layers)


def tucker_macs(manifest: dict, H: int, I: int, K: int) -> int:
    """Multiply-adds per token of the native runtime's expert mixture (tucker_experts.py):
    x U_H per projection and U_H,d^T once per token; per routed pair G_g, G_u, G_d and the
    three U_I products."""
    by_layer: dict = {}
    for t in manifest["tensors"]:
        by_layer.setdefault(t["layer"], {})[t["projection"]] = t["ranks"]
    macs = 0
    for r in by_layer.values():
        macs += H * (r["gate"][1] + r["up"][1] + r["down"][1])
        macs += K * sum(r[p][1] * r[p][2] + I * r[p][2] for p in ("gate", "up", "down"))
    return macs


# ----------------------------------------------------------------------------- the bench
class Bench:
    def __init__(self, key: str, work: Path, log, rows_file: Path | None = None):
        self.key, self.folder, self.work, self.log = key, MODELS[key], work / key, log
        self.work.mkdir(parents=True, exist_ok=True)
        self.d = Dense(self.folder)
        t = time.time()
        self.score = Scorer(self.folder)
        self.log(f"[{key}] baseline scored ({time.time() - t:.0f} s)")
        t = time.time()
        self.stats = collect_stats(self.folder)
        self.log(f"[{key}] calibration statistics ({time.time() - t:.0f} s)")
        self.tucker_stats: Path | None = None
        self.rows: list[dict] = []
        self.n = 0
        self.rows_file = rows_file  # every row appended as it is made (JSON lines)

    def row(self, budget: float | None, method: str, setting: str, folder: Path, nbytes: int, macs: int,
            extra: dict | None = None) -> dict:
        r = {"model": self.key, "removed": budget, "method": method, "setting": setting, "bytes": nbytes,
             "bytes_ratio": nbytes / self.d.dense_bytes, "macs": macs, **self.score(folder), **(extra or {})}
        self.rows.append(r)
        if self.rows_file is not None:
            with open(self.rows_file, "a") as fh:
                fh.write(json.dumps(r, default=float) + "\n")
        self.log(f"[{self.key}] {budget} {method} {setting}: bytes {r['bytes_ratio']:.3f} ppl {r['ppl']:.2f} "
                 f"kl {r['kl']:.4f} top1 {r['top1']:.3f}")
        return r

    def dense_row(self, budget, method, setting, tensors, nbytes, macs, config=None) -> dict:
        self.n += 1
        folder = self.d.write(self.work / f"dense{self.n}", tensors, config)
        r = self.row(budget, method, setting, folder, nbytes, macs)
        shutil.rmtree(folder)
        return r

    # -- Tucker -------------------------------------------------------------------------------
    def tucker(self, budget_bytes: int, factor_dtype: str) -> tuple[Path, dict, int]:
        """A calibrated Tucker checkpoint at or under ``budget_bytes``: the ratio is guessed from
        the bytes per parameter and shrunk until the stored bytes fit."""
        from tuckerize.compress import decompose_checkpoint

        params = self.d.dense_bytes // 2
        bpp = {"bf16": 2.0, "float32": 2.0, "int8": 1.02, "int4": 0.53}.get(factor_dtype, 0.56)
        ratio = min(0.95, budget_bytes / (params * bpp) * 0.985)
        for _ in range(4):
            self.n += 1
            out = self.work / f"tucker{self.n}"
            kw = {"stats": self.tucker_stats} if self.tucker_stats else {}
            manifest = decompose_checkpoint(str(self.folder), out, ratio=ratio, calibration="demo", samples=SAMPLES,
                                            seqlen=SEQLEN, save_config=self.work / f"tucker{self.n}.yaml",
                                            overwrite=True, factor_dtype=factor_dtype, **kw)
            if self.tucker_stats is None:
                self.tucker_stats = self.work / "tucker_stats"
                shutil.copytree(out, self.tucker_stats, dirs_exist_ok=True)
            # float32 (the sensitivity runs only) is counted as bf16
            nbytes = manifest["bytes"]["experts_factors_as_bf16" if factor_dtype == "float32" else "experts_stored"]
            if nbytes <= budget_bytes:
                return out, manifest, nbytes
            ratio *= budget_bytes / nbytes * 0.99
            shutil.rmtree(out)
        raise RuntimeError(f"no Tucker setting under {budget_bytes} bytes")

    def tucker_row(self, budget, budget_bytes, factor_dtype, method) -> dict:
        out, manifest, nbytes = self.tucker(budget_bytes, factor_dtype)
        r = self.row(budget, method, f"--ratio {manifest['params']['experts_ratio']:.3f} --factor-dtype {factor_dtype}",
                     out, nbytes, tucker_macs(manifest, self.d.H, self.d.I, self.d.K),
                     {"params_ratio": manifest["params"]["experts_ratio"]})
        shutil.rmtree(out)
        return r

    def choose_tucker_dtype(self, budget_bytes: int) -> tuple[str, list[dict]]:
        trials = []
        for fd in TUCKER_DTYPES:
            out, manifest, nbytes = self.tucker(budget_bytes, fd)
            s = self.score(out, "select")
            trials.append({"factor_dtype": fd, "bytes": nbytes, "params_ratio": manifest["params"]["experts_ratio"], **s})
            self.log(f"[{self.key}] select Tucker {fd} at {budget_bytes}: ppl {s['ppl']:.2f}")
            shutil.rmtree(out)
        return min(trials, key=lambda r: r["ppl"])["factor_dtype"], trials

    def sensitivity(self) -> list[dict]:
        """Selection-split perplexity of one calibrated Tucker rank plan (50% of the bytes as
        bf16) stored float32, then with one factor kind at a time stored int4 (the others
        float32), and all four with and without the core refit: the same ranks, decomposed
        again from the same statistics with ``factor_dtype`` set per factor."""
        import contextlib

        import tuckerize.quant as quant
        from tuckerize.compress import decompose_checkpoint

        @contextlib.contextmanager
        def core_refit(refit: bool):  # the product always refits; the bench measures what that buys
            real = quant.storage
            quant.storage = lambda dtypes, group=quant.DEFAULT_GROUP, refit_=refit: real(dtypes, group, refit_)
            try:
                yield
            finally:
                quant.storage = real

        out, manifest, _ = self.tucker(self.d.dense_bytes // 2, "float32")
        plan = self.work / f"tucker{self.n}.yaml"  # that run's rank plan
        res = [{"quantised": "none", "refit": None, "bytes": manifest["bytes"]["experts_stored"],
                **self.score(out, "select")}]
        shutil.rmtree(out)
        for kind in ("U_E", "U_H", "U_I", "core", "all"):
            for refit in ((True, False) if kind == "all" else (False,)):
                q = self.work / "sens"
                fd = ",".join(f"{f}={'int4' if kind in (f, 'all') else 'float32'}" for f in quant.FACTOR_KINDS)
                with core_refit(refit):
                    m = decompose_checkpoint(str(self.folder), q, config=plan, calibration="demo", samples=SAMPLES,
                                             seqlen=SEQLEN, stats=self.tucker_stats, overwrite=True, factor_dtype=fd)
                res.append({"quantised": kind, "refit": refit, "bytes": m["bytes"]["experts_stored"],
                            **self.score(q, "select")})
                self.log(f"[{self.key}] sensitivity int4 {kind} refit={refit}: ppl {res[-1]['ppl']:.2f}")
                shutil.rmtree(q)
        return res

    def run(self, sensitivity: bool = True, removed_list=REMOVED, ridge: float | None = None,
            rtn_rows: bool = True) -> dict:
        d = self.d
        base = self.score.baseline("report")
        self.rows.append({"model": self.key, "removed": 0.0, "method": "original", "setting": "bf16 dense experts",
                          "bytes": d.dense_bytes, "bytes_ratio": 1.0, "macs": d.dense_macs, **base})
        sens = self.sensitivity() if sensitivity else None
        # selection-split choices
        sel_svd = []
        for ridge in (SVD_RIDGES if ridge is None else ()):
            self.n += 1
            tensors, _ = svd(d, round(0.5 * d.H * d.I / (d.H + d.I)), self.stats, ridge)
            folder = d.write(self.work / f"dense{self.n}", tensors)
            sel_svd.append({"ridge": ridge, **self.score(folder, "select")})
            shutil.rmtree(folder)
        ridge = min(sel_svd, key=lambda r: r["ppl"])["ridge"] if sel_svd else ridge
        self.log(f"[{self.key}] whitened SVD ridge chosen on the selection split: {ridge}")
        rtn_done: dict[int, dict] = {}
        for bits in ((4, 3) if rtn_rows else ()):
            tensors, nbytes = rtn(d, bits)
            rtn_done[bits] = self.dense_row(None, f"RTN int{bits}", "asymmetric, group min(128, in)", tensors,
                                            nbytes, d.dense_macs)
        choices = {}
        for removed in removed_list:
            budget = int(d.dense_bytes * (1 - removed))
            self.tucker_row(removed, budget, "bf16", "Tucker (bf16 factors)")
            fd, trials = self.choose_tucker_dtype(budget)
            choices[str(removed)] = {"chosen": fd, "trials": trials}
            self.tucker_row(removed, budget, fd, "Tucker (quantised factors)")
            for bits, r in rtn_done.items():
                if r["bytes"] <= budget:
                    self.rows.append({**r, "removed": removed})
            keep = int(d.E * (1 - removed))
            freq = {lay: s["freq"] for lay, s in self.stats.items()}
            reap = {lay: s["reap"] for lay, s in self.stats.items()}
            t, cfg, nb = prune(d, keep, freq)
            self.dense_row(removed, "prune (frequency)", f"{keep} of {d.E} experts", t, nb, d.dense_macs, cfg)
            t, cfg, nb = prune(d, keep, reap)
            self.dense_row(removed, "prune (REAP)", f"{keep} of {d.E} experts", t, nb, d.dense_macs, cfg)
            t, nb = merge(d, keep, self.stats)
            self.dense_row(removed, "merge (frequency-weighted)", f"{keep} clusters of {d.E}", t, nb, d.dense_macs)
            rank = int((1 - removed) * d.H * d.I / (d.H + d.I))
            macs = len(d.layers) * d.K * 3 * rank * (d.H + d.I)
            t, nb = svd(d, rank, None)
            self.dense_row(removed, "SVD per expert", f"rank {rank}", t, nb, macs)
            t, nb = svd(d, rank, self.stats, ridge)
            self.dense_row(removed, "SVD-LLM (whitened)", f"rank {rank}, ridge {ridge}", t, nb, macs)
        rtn_unplaced = [r for r in rtn_done.values() if r["bytes"] > d.dense_bytes * (1 - REMOVED[0])]
        for r in rtn_done.values():
            if r in self.rows:
                self.rows.remove(r)
        return {"rows": self.rows, "rtn_over_every_budget": rtn_unplaced, "sensitivity": sens,
                "tucker_dtype_selection": choices, "svd_ridge_selection": sel_svd}


def table(result: dict, model: str) -> str:
    lines = ["| removed (budget) | method | setting | expert bytes (of bf16 dense) | MACs / token | perplexity | KL | top-1 |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    rows = result["rows"]
    best: dict = {}
    for r in rows:
        if r["method"] != "original":
            key = r["removed"]
            best[key] = min(best.get(key, math.inf), r["ppl"])
    for r in rows:
        ppl = f"{r['ppl']:.2f}"
        if r["method"] != "original" and r["ppl"] == best[r["removed"]]:
            ppl = f"**{ppl}**"
        removed = "0%" if r["removed"] == 0 else f"{r['removed']:.0%}"
        lines.append(f"| {removed} | {r['method']} | {r['setting']} | {r['bytes']:,} ({r['bytes_ratio']:.1%}) | "
                     f"{r['macs']:,} | {ppl} | {r['kl']:.4f} | {r['top1']:.3f} |")
    return "\n".join(lines)


def plot(result: dict, model: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    seen: dict = {}
    for r in result["rows"]:
        if r["method"] == "original":
            ax.axhline(r["ppl"], color="k", ls="--", lw=0.8, label="original (bf16 dense experts)")
        else:
            seen.setdefault(r["method"], {})[(r["bytes"], r["ppl"])] = True
    for method, pts in seen.items():
        xs, ys = zip(*sorted(pts))
        ax.plot([x / 1e6 for x in xs], ys, "o-" if len(xs) > 1 else "o", label=method,
                 mfc="none" if method.startswith(("GPTQ", "AWQ")) else None)
    ax.set_xlabel("routed-expert bytes (MB)")
    ax.set_ylabel("held-out perplexity (report split)")
    ax.set_title(f"{model} demo: perplexity vs expert bytes")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def add_models(specs: list[str]) -> list[str]:
    """``KEY=FOLDER`` entries into ``MODELS`` (a folder written by scripts/train_demo.py: its
    model.safetensors, tokenizer and heldout.txt). Returns the keys."""
    keys = []
    for spec in specs:
        key, sep, folder = spec.partition("=")
        path = Path(folder).expanduser().resolve()
        if not sep or not key or key in ("qwen3", "mixtral"):
            raise SystemExit(f"--model-folder {spec!r}: give KEY=FOLDER with a new KEY (not qwen3 or mixtral)")
        missing = [f for f in ("config.json", "model.safetensors", "heldout.txt") if not (path / f).is_file()]
        if missing:
            raise SystemExit(f"--model-folder {spec!r}: {path} lacks {', '.join(missing)}; "
                             "train it with scripts/train_demo.py --out FOLDER")
        MODELS[key] = path
        keys.append(key)
    return keys


def gptq_row(key: str, python: str, work: Path, log, samples: int = 16) -> dict:
    """GPTQ int4 of ``key``'s experts by llmcompressor (bench/baselines/gptq.py, run with
    ``python``, its own environment), scored like every other row; bytes as RTN int4's."""
    return llmcompressor_row("gptq", key, python, work, log, samples)


LLMCOMPRESSOR = {"gptq": "GPTQ int4 (llmcompressor)", "awq": "AWQ int4 (llmcompressor)"}


def llmcompressor_row(kind: str, key: str, python: str, work: Path, log, samples: int = 16) -> dict:
    """``kind`` (gptq, awq) int4 of ``key``'s experts by llmcompressor (bench/baselines/KIND.py,
    run with ``python``, its own environment), scored like every other row; bytes as RTN
    int4's (4 bits per weight + float16 scale and zero per group)."""
    import subprocess

    d = Dense(MODELS[key])
    out = work / f"{kind}-{key}"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    t = time.time()
    subprocess.run([python, str(REPO / "bench" / "baselines" / f"{kind}.py"), str(MODELS[key]), str(out),
                    "--samples", str(samples), "--seqlen", str(SEQLEN)], check=True, env=env,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log(f"[{key}] {kind} ({time.time() - t:.0f} s)")
    _, nbytes = rtn(d, 4)
    score = Scorer(MODELS[key])
    r = {"model": key, "removed": None, "method": LLMCOMPRESSOR[kind],
         "setting": f"asymmetric, group min(128, in), {samples} calibration windows", "bytes": nbytes,
         "bytes_ratio": nbytes / d.dense_bytes, "macs": d.dense_macs, **score(out)}
    log(f"[{key}] {r['method']}: ppl {r['ppl']:.2f} kl {r['kl']:.4f} top1 {r['top1']:.3f}")
    shutil.rmtree(out)
    return r


def report(files: list[Path]) -> None:
    """Merge result files (the main runs and ``--only gptq``): tables and Pareto plots."""
    models: dict = {}
    extras: dict = {}
    for f in files:
        data = json.loads(f.read_text())
        for key, res in data["models"].items():
            if key not in MODELS and res.get("folder"):
                MODELS[key] = Path(res["folder"])
            cur = models.setdefault(key, {"rows": []})
            have_original = any(r["method"] == "original" for r in cur["rows"])
            cur["rows"] += [r for r in res.get("rows", []) if not (have_original and r["method"] == "original")]
            extras.setdefault(key, []).extend(res.get("extra_rows", []))
    for key, cur in models.items():
        dense = Dense(MODELS[key]).dense_bytes
        budgets = sorted({r["removed"] for r in cur["rows"] if r["removed"]})
        for extra in extras.get(key, []):
            for removed in budgets:
                if extra["bytes"] <= dense * (1 - removed):
                    cur["rows"].append({**extra, "removed": removed})
    for key, res in models.items():
        order = {m: i for i, m in enumerate(["original", "Tucker (bf16 factors)", "Tucker (quantised factors)",
                                             "RTN int4", "RTN int3", "GPTQ int4 (llmcompressor)",
                                             "AWQ int4 (llmcompressor)"])}
        res["rows"].sort(key=lambda r: (r["removed"] or 0, order.get(r["method"], 99)))
        plot(res, key, OUT / f"compare_{key}.png")
        print(f"\n### {key}\n")
        print(table(res, key))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", help="comma-separated keys (default: qwen3,mixtral, or the --model-folder keys)")
    ap.add_argument("--model-folder", action="append", default=[], metavar="KEY=FOLDER",
                    help="add a model folder written by scripts/train_demo.py (repeatable)")
    ap.add_argument("--work", type=Path, default=OUT / "compare_work")
    ap.add_argument("--json", type=Path, default=OUT / "compare.json", help="where the results go")
    ap.add_argument("--budgets", default=",".join(map(str, REMOVED)), help="fractions of expert bytes removed")
    ap.add_argument("--svd-ridge", type=float, help="whitened-SVD ridge (default: chosen on the selection split)")
    ap.add_argument("--skip-rtn", action="store_true", help="no RTN rows (when another run has them)")
    ap.add_argument("--skip-sensitivity", action="store_true", help="no per-factor int4 sensitivity runs")
    ap.add_argument("--only", choices=["gptq", "awq", "sensitivity"],
                    help="only the GPTQ / AWQ rows (needs --gptq-python / --awq-python), or only the per-factor "
                         "int4 sensitivity runs")
    ap.add_argument("--gptq-python", help="python of an environment with llmcompressor (it pins its own versions)")
    ap.add_argument("--gptq-samples", type=int, default=16, help="GPTQ calibration windows (llmcompressor's "
                    "sequential pipeline is slow on 2 shared cores)")
    ap.add_argument("--awq-python", help="python with llmcompressor for --only awq (default: --gptq-python)")
    ap.add_argument("--awq-samples", type=int, default=16, help="AWQ calibration windows (as GPTQ's)")
    ap.add_argument("--report", type=Path, nargs="+", help="merge these result files into tables and plots")
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    started = time.time()

    def log(msg: str) -> None:
        print(f"{time.time() - started:7.1f}s {msg}", flush=True)

    added = add_models(args.model_folder)
    args.models = args.models or ",".join(added) or "qwen3,mixtral"
    unknown = [k for k in args.models.split(",") if k not in MODELS]
    if unknown and not args.report:
        raise SystemExit(f"--models {','.join(unknown)}: unknown; known: {', '.join(MODELS)} (add with --model-folder)")
    if args.report:
        report(args.report)
        return
    if args.only == "gptq":
        res = {"command": "python bench/compare.py " + " ".join(sys.argv[1:]), "models": {}}
        for key in args.models.split(","):
            args.work.mkdir(parents=True, exist_ok=True)
            res["models"][key] = {"folder": str(MODELS[key]),
                                  "extra_rows": [gptq_row(key, args.gptq_python, args.work, log, args.gptq_samples)]}
            args.json.write_text(json.dumps(res, indent=1, default=float))
        return
    if args.only == "awq":
        res = {"command": "python bench/compare.py " + " ".join(sys.argv[1:]), "models": {}}
        for key in args.models.split(","):
            args.work.mkdir(parents=True, exist_ok=True)
            row = llmcompressor_row("awq", key, args.awq_python or args.gptq_python, args.work, log, args.awq_samples)
            res["models"][key] = {"folder": str(MODELS[key]), "extra_rows": [row]}
            args.json.write_text(json.dumps(res, indent=1, default=float))
        return

    result = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                          "threads": torch.get_num_threads()},
              "command": "python bench/compare.py " + " ".join(sys.argv[1:]), "models": {}}
    if args.only == "sensitivity":
        for key in args.models.split(","):
            bench = Bench(key, args.work, log)
            result["models"][key] = {"folder": str(MODELS[key]), "baseline_select": bench.score.baseline("select"),
                                     "sensitivity": bench.sensitivity()}
            args.json.write_text(json.dumps(result, indent=1, default=float))
        shutil.rmtree(args.work, ignore_errors=True)
        return
    for key in args.models.split(","):
        bench = Bench(key, args.work, log, args.json.with_suffix(".rows.jsonl"))
        result["models"][key] = {"folder": str(MODELS[key]),
                                 **bench.run(sensitivity=not args.skip_sensitivity,
                                             removed_list=[float(b) for b in args.budgets.split(",")],
                                             ridge=args.svd_ridge, rtn_rows=not args.skip_rtn)}
        plot(result["models"][key], key, OUT / f"compare_{key}.png")
        print(table(result["models"][key], key), flush=True)
        args.json.write_text(json.dumps(result, indent=1, default=float))
    result["wall_seconds"] = round(time.time() - started, 1)
    args.json.write_text(json.dumps(result, indent=1, default=float))
    shutil.rmtree(args.work, ignore_errors=True)
    log("done")


if __name__ == "__main__":
    main()

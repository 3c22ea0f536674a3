"""The equal-budget table of issue 11: at 25%, 50%, 75% of the routed experts' bytes removed,
calibrated Tucker (bf16 and quantised factors) against RTN int4/int3, pruning (frequency, REAP),
merging, per-expert SVD and SVD-LLM; and the per-factor int4 sensitivity of one rank plan."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from comparison.dense import Dense, merge, prune, svd
from comparison.protocol import MODELS, SAMPLES, SEQLEN
from comparison.quantisers import rtn
from comparison.scoring import Scorer, collect_stats
from comparison.tucker import TuckerRows, tucker_macs

REMOVED = (0.25, 0.50, 0.75)
TUCKER_DTYPES = ("int8,core=int4", "int4")
SVD_RIDGES = (1e-3, 1e-1)


class Bench:
    def __init__(self, key: str, work: Path, log, rows_file: Path | None = None, stats: bool = True):
        self.key, self.folder, self.work, self.log = key, MODELS[key], work / key, log
        self.work.mkdir(parents=True, exist_ok=True)
        self.d = Dense(self.folder)
        t = time.time()
        self.score = Scorer(self.folder)
        self.log(f"[{key}] baseline scored ({time.time() - t:.0f} s)")
        t = time.time()
        self.stats = collect_stats(self.folder) if stats else None
        if stats:
            self.log(f"[{key}] calibration statistics ({time.time() - t:.0f} s)")
        self.tucker_rows = TuckerRows(self.folder, self.work, self.d.dense_bytes, log)
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
        out, manifest, nbytes, _ = self.tucker_rows.fit(budget_bytes, {"factor_dtype": factor_dtype})
        return out, manifest, nbytes

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
            trials.append({"factor_dtype": fd, "bytes": nbytes, "params_ratio": manifest["params"]["experts_ratio"],
                           **s})
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
        plan = self.work / f"tucker{self.tucker_rows.n}.yaml"  # that run's rank plan
        res = [{"quantised": "none", "refit": None, "bytes": manifest["bytes"]["experts_stored"],
                **self.score(out, "select")}]
        shutil.rmtree(out)
        for kind in ("U_E", "U_H", "U_I", "core", "all"):
            for refit in ((True, False) if kind == "all" else (False,)):
                q = self.work / "sens"
                fd = ",".join(f"{f}={'int4' if kind in (f, 'all') else 'float32'}" for f in quant.FACTOR_KINDS)
                with core_refit(refit):
                    m = decompose_checkpoint(str(self.folder), q, config=plan, calibration="demo", samples=SAMPLES,
                                             seqlen=SEQLEN, stats=self.tucker_rows.stats, overwrite=True,
                                             factor_dtype=fd)
                res.append({"quantised": kind, "refit": refit, "bytes": m["bytes"]["experts_stored"],
                            **self.score(q, "select")})
                self.log(f"[{self.key}] sensitivity int4 {kind} refit={refit}: ppl {res[-1]['ppl']:.2f}")
                shutil.rmtree(q)
        return res

    def _structural_rows(self, removed: float, ridge: float) -> None:
        d = self.d
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

    def run(self, sensitivity: bool = True, removed_list=REMOVED, ridge: float | None = None,
            rtn_rows: bool = True) -> dict:
        d = self.d
        base = self.score.baseline("report")
        self.rows.append({"model": self.key, "removed": 0.0, "method": "original", "setting": "bf16 dense experts",
                          "bytes": d.dense_bytes, "bytes_ratio": 1.0, "macs": d.dense_macs, **base})
        sens = self.sensitivity() if sensitivity else None
        sel_svd = []  # selection-split choice of the whitened-SVD ridge
        for r in (SVD_RIDGES if ridge is None else ()):
            self.n += 1
            tensors, _ = svd(d, round(0.5 * d.H * d.I / (d.H + d.I)), self.stats, r)
            folder = d.write(self.work / f"dense{self.n}", tensors)
            sel_svd.append({"ridge": r, **self.score(folder, "select")})
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
            for r in rtn_done.values():
                if r["bytes"] <= budget:
                    self.rows.append({**r, "removed": removed})
            self._structural_rows(removed, ridge)
        rtn_unplaced = [r for r in rtn_done.values() if r["bytes"] > d.dense_bytes * (1 - REMOVED[0])]
        for r in rtn_done.values():
            if r in self.rows:
                self.rows.remove(r)
        return {"rows": self.rows, "rtn_over_every_budget": rtn_unplaced, "sensitivity": sens,
                "tucker_dtype_selection": choices, "svd_ridge_selection": sel_svd}

"""The bytes frontier of issue 23: every method's perplexity and KL against its stored bytes,
8% to 30% of the bf16 dense experts, and the test "at every budget some tuckerize setting has
lower perplexity and KL than every baseline at equal or fewer bytes".

Rows (each scored on both splits; the tables show the report split):

* baselines: round-to-nearest (:mod:`comparison.quantisers`) at 2, 3 and 4 bits, GPTQ
  (llmcompressor) and HQQ (:mod:`comparison.external`) at 2 and 3 bits, with groups of 32, 64,
  128 (settings over 32% of bf16 are left out), asymmetric, scales and zeros counted;
* tuckerize: for every budget in ``BUDGETS`` and every setting in
  :data:`comparison.tucker.TUCKER_SETTINGS`, the product asked for that budget
  (:func:`comparison.tucker.tucker_request`).

:func:`frontier_check` is the test: at a budget ``b`` the tuckerize row is the one with bytes
<= ``b`` that has the lowest SELECTION-split perplexity (settings are never chosen on the
report split); it must have a lower REPORT-split perplexity than every baseline row with
bytes <= ``b`` and a lower KL than every such row. Both lower envelopes are step functions of
``b`` that change only at a row's bytes, so checking at every row's bytes in the range (and at
its ends) checks every budget.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from comparison.dense import Dense
from comparison.external import external_row
from comparison.protocol import MODELS
from comparison.quantisers import quantised_bytes, rtn
from comparison.scoring import Scorer
from comparison.tucker import TUCKER_SETTINGS, TuckerRows, setting_text, tucker_macs

RANGE = (0.08, 0.30)
BUDGETS = (0.08, 0.11, 0.14, 0.18, 0.22, 0.26, 0.30)
GROUPS = (32, 64, 128)
#: (method, bits) grids; a setting is run when its bytes are at most RANGE[1] + SLACK of bf16
GRID = {"rtn": (2, 3, 4), "hqq": (2, 3), "gptq": (2, 3), "awq": (2, 3)}  # int4 GPTQ / AWQ: issue 11's rows
SLACK = 0.02
METHODS = ("rtn", "hqq", "gptq", "tucker")


def frontier_check(rows: list[dict], lo: float = RANGE[0], hi: float = RANGE[1]) -> dict:
    """The "equal or fewer bytes" test on ``rows`` (each with ``family`` tuckerize / baseline,
    ``bytes_ratio``, report ``ppl`` / ``kl`` and, for tuckerize rows, ``select`` scores).

    Returns ``{"points": [...], "met_fraction": share of [lo, hi] where the test holds}``;
    each point has the budget, the tuckerize row chosen there, the baselines with the lowest
    perplexity and the lowest KL at equal or fewer bytes, whether it holds, and the margins
    (tuckerize minus best baseline: perplexity in percent of the baseline's, KL absolute)."""
    tucker = [r for r in rows if r.get("family") == "tuckerize"]
    base = [r for r in rows if r.get("family") == "baseline"]
    points = sorted({lo, hi} | {r["bytes_ratio"] for r in tucker + base if lo <= r["bytes_ratio"] <= hi})
    out = []
    for b in points:
        cands = [r for r in tucker if r["bytes_ratio"] <= b]
        t = min(cands, key=lambda r: (r["select"]["ppl"], r["select"]["kl"])) if cands else None
        rivals = [r for r in base if r["bytes_ratio"] <= b]
        bp = min(rivals, key=lambda r: r["ppl"]) if rivals else None
        bk = min(rivals, key=lambda r: r["kl"]) if rivals else None
        met = t is not None and (bp is None or (t["ppl"] < bp["ppl"] and t["kl"] < bk["kl"]))
        p = {"budget": b, "met": met, "tucker": _brief(t), "best_ppl": _brief(bp), "best_kl": _brief(bk)}
        if t is not None and bp is not None:
            p["ppl_margin_pct"] = 100 * (t["ppl"] / bp["ppl"] - 1)
            p["kl_margin"] = t["kl"] - bk["kl"]
        out.append(p)
    met_len = sum(nxt["budget"] - cur["budget"] for cur, nxt in zip(out, out[1:]) if cur["met"])
    return {"range": [lo, hi], "points": out, "met_fraction": met_len / (hi - lo) if hi > lo else float(out[0]["met"])}


def _brief(r: dict | None) -> dict | None:
    if r is None:
        return None
    return {k: r[k] for k in ("method", "setting", "bits", "group", "bytes_ratio", "ppl", "kl", "top1") if k in r}


class Frontier:
    """Every row of one model's frontier; rows appended to ``rows_file`` as they are made."""

    def __init__(self, key: str, work: Path, log, python: str | None, samples: int = 16,
                 rows_file: Path | None = None):
        self.key, self.folder, self.work, self.log = key, MODELS[key], work / key, log
        self.work.mkdir(parents=True, exist_ok=True)
        self.python, self.samples, self.rows_file = python, samples, rows_file
        self.d = Dense(self.folder)
        t = time.time()
        self.score = Scorer(self.folder)
        self.log(f"[{key}] original scored ({time.time() - t:.0f} s)")
        self.rows: list[dict] = []

    def _add(self, r: dict) -> dict:
        self.rows.append(r)
        if self.rows_file is not None:
            with open(self.rows_file, "a") as fh:
                fh.write(json.dumps(r, default=float) + "\n")
        return r

    def grid(self, method: str) -> list[tuple[int, int]]:
        scheme = "hqq" if method == "hqq" else "rtn"
        return [(b, g) for b in GRID[method] for g in GROUPS
                if quantised_bytes(self.d, scheme, b, g) <= (RANGE[1] + SLACK) * self.d.dense_bytes]

    def rtn_rows(self) -> None:
        for bits, group in self.grid("rtn"):
            tensors, nbytes = rtn(self.d, bits, group)
            folder = self.d.write(self.work / "rtn", tensors)
            s = self.score.splits_of(folder)
            shutil.rmtree(folder)
            r = self._add({"model": self.key, "family": "baseline", "method": "RTN", "setting": f"int{bits}, group "
                           f"{group} (min(group, in))", "bits": bits, "group": group, "bytes": nbytes,
                           "bytes_ratio": nbytes / self.d.dense_bytes, "macs": self.d.dense_macs, **s["report"],
                           "select": s["select"]})
            self.log(f"[{self.key}] RTN int{bits} g{group}: bytes {r['bytes_ratio']:.3f} ppl {r['ppl']:.2f} "
                     f"kl {r['kl']:.4f}")

    def external_rows(self, kind: str) -> None:
        for bits, group in self.grid(kind):
            self._add(external_row(kind, bits, group, key=self.key, dense=self.d, scorer=self.score,
                                   python=self.python, work=self.work, log=self.log, samples=self.samples))

    def tucker_rows(self, budgets=BUDGETS, settings=TUCKER_SETTINGS) -> None:
        rows = TuckerRows(self.folder, self.work, self.d.dense_bytes, self.log)
        if rows.uses_bytes:  # --bytes chooses the storage itself: one row per budget
            settings = ({},)
        largest: set[str] = set()  # settings whose largest form fitted a smaller budget already
        for b in budgets:
            for setting in settings:
                if setting_text(setting) in largest:
                    continue
                t = time.time()
                out, manifest, nbytes, cli = rows.fit(int(b * self.d.dense_bytes), setting)
                s = self.score.splits_of(out)
                shutil.rmtree(out)
                r = self._add({"model": self.key, "family": "tuckerize", "method": f"tuckerize {setting_text(setting)}",
                               "setting": cli, "budget": b, "bytes": nbytes, "bytes_ratio": nbytes / self.d.dense_bytes,
                               "macs": tucker_macs(manifest, self.d.H, self.d.I, self.d.K),
                               "params_ratio": manifest["params"]["experts_ratio"], **s["report"],
                               "select": s["select"], "seconds": round(time.time() - t, 1)})
                if not rows.uses_bytes and r["params_ratio"] >= 0.94 and nbytes < 0.97 * b * self.d.dense_bytes:
                    largest.add(setting_text(setting))  # today's ratio cap (0.95): larger budgets ask the same
                self.log(f"[{self.key}] tuckerize {cli}: bytes {r['bytes_ratio']:.3f} ppl {r['ppl']:.2f} "
                         f"kl {r['kl']:.4f} (select {s['select']['ppl']:.2f}; {r['seconds']:.0f} s)")

    def run(self, methods=METHODS, budgets=BUDGETS, settings=TUCKER_SETTINGS) -> dict:
        base = {k: self.score.baseline(k) for k in ("select", "report")}
        self.rows.append({"model": self.key, "family": "original", "method": "original",
                          "setting": "bf16 dense experts",
                          "bytes": self.d.dense_bytes, "bytes_ratio": 1.0, "macs": self.d.dense_macs, **base["report"],
                          "select": base["select"]})
        if "rtn" in methods:
            self.rtn_rows()
        for kind in ("hqq", "gptq", "awq"):
            if kind in methods:
                self.external_rows(kind)
        if "tucker" in methods:
            self.tucker_rows(budgets, settings)
        return {"folder": str(self.folder), "frontier_rows": self.rows, "frontier": frontier_check(self.rows)}

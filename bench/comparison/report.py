"""Tables and plots, from a run or from saved result files (``bench/compare.py --report``).

Issue 11's equal-budget tables (rows with ``removed``) and their Pareto plots
(``bench/out/compare_KEY.png``); issue 23's frontier tables (every row, then the "equal or
fewer bytes" test per budget) and plots (``bench/out/frontier_KEY.png``: perplexity and KL
against stored bytes, 8% to 30% of bf16).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from comparison.dense import Dense
from comparison.frontier import RANGE, frontier_check
from comparison.protocol import MODELS, OUT

ORDER = ["original", "Tucker (bf16 factors)", "Tucker (quantised factors)", "RTN int4", "RTN int3",
         "GPTQ int4 (llmcompressor)", "AWQ int4 (llmcompressor)"]
CAVEAT = ("Our bench models are small and briefly trained (the demos on 9.8 M tokens on a GPU with bf16 autocast, "
          "moe64 on 2.6 M tokens in float32 on a CPU): their weights and expert inputs are close to Gaussian "
          "(bench/outliers.py), so they flatter weight quantisation next to real checkpoints; the outlier model "
          "(bf16 autocast, 3.3x the learning rate, no weight decay) has some outlier channels, far fewer than a "
          "real LLM.")


def table(result: dict, model: str) -> str:
    lines = ["| removed (budget) | method | setting | expert bytes (of bf16 dense) | MACs / token | perplexity | KL "
             "| top-1 |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    rows = result["rows"]
    best: dict = {}
    for r in rows:
        if r["method"] != "original":
            best[r["removed"]] = min(best.get(r["removed"], math.inf), r["ppl"])
    for r in rows:
        ppl = f"{r['ppl']:.2f}"
        if r["method"] != "original" and r["ppl"] == best[r["removed"]]:
            ppl = f"**{ppl}**"
        removed = "0%" if r["removed"] == 0 else f"{r['removed']:.0%}"
        lines.append(f"| {removed} | {r['method']} | {r['setting']} | {r['bytes']:,} ({r['bytes_ratio']:.1%}) | "
                     f"{r['macs']:,} | {ppl} | {r['kl']:.4f} | {r['top1']:.3f} |")
    return "\n".join(lines)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot(result: dict, model: str, path: Path) -> None:
    plt = _pyplot()
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


# -- the frontier --------------------------------------------------------------------------------
def frontier_table(rows: list[dict]) -> str:
    lines = ["| method | setting | expert bytes (of bf16 dense) | perplexity | KL | top-1 | selection perplexity |",
             "|---|---|---:|---:|---:|---:|---:|"]
    seen = set()
    for r in sorted(rows, key=lambda r: (r["family"] != "original", r["bytes_ratio"], r["method"])):
        if (r["method"], r["setting"], r["bytes"]) in seen:  # the same request made for two budgets
            continue
        seen.add((r["method"], r["setting"], r["bytes"]))
        sel = r.get("select", {}).get("ppl")
        lines.append(f"| {r['method']} | {r['setting']} | {r['bytes']:,} ({r['bytes_ratio']:.1%}) | {r['ppl']:.2f} | "
                     f"{r['kl']:.4f} | {r['top1']:.3f} | {'' if sel is None else f'{sel:.2f}'} |")
    return "\n".join(lines)


def _label(r: dict) -> str:
    """A short name of a row: ``GPTQ (llmcompressor) int2 g64``, or a tuckerize row's options."""
    if "bits" in r:
        return f"{r['method']} int{r['bits']} g{r['group']}"
    return r["setting"]


def check_table(check: dict) -> str:
    """The test per budget interval: consecutive budgets with the same chosen rows are one line."""
    lines = ["| budgets (of bf16) | tuckerize row (chosen on the selection split) | ppl | KL | "
             "lowest-ppl baseline at <= budget | lowest-KL baseline at <= budget | holds | margin ppl / KL |",
             "|---|---|---:|---:|---|---|:-:|---:|"]
    pts = check["points"]
    spans: list[list[dict]] = []
    for p in pts:
        key = tuple(_label(p[k]) if p[k] else None for k in ("tucker", "best_ppl", "best_kl")) + (p["met"],)
        if spans and spans[-1][0]["_key"] == key:
            spans[-1].append({**p, "_key": key})
        else:
            spans.append([{**p, "_key": key}])
    for i, span in enumerate(spans):
        p = span[0]
        end = spans[i + 1][0]["budget"] if i + 1 < len(spans) else span[-1]["budget"]
        where = f"{p['budget']:.1%}-{end:.1%}" if end > p["budget"] else f"{p['budget']:.1%}"
        t, bp, bk = p["tucker"], p["best_ppl"], p["best_kl"]
        tc = f"{t['setting']} ({t['bytes_ratio']:.1%})" if t else "none fits"
        tp, tk = (f"{t['ppl']:.2f}", f"{t['kl']:.4f}") if t else ("", "")
        bpc = f"{_label(bp)} ({bp['bytes_ratio']:.1%}): {bp['ppl']:.2f}" if bp else "none fits"
        bkc = f"{_label(bk)}: {bk['kl']:.4f}" if bk else ""
        margin = f"{p['ppl_margin_pct']:+.2f}% / {p['kl_margin']:+.4f}" if "ppl_margin_pct" in p else ""
        lines.append(f"| {where} | {tc} | {tp} | {tk} | {bpc} | {bkc} | {'yes' if p['met'] else '**no**'} | {margin} |")
    lo, hi = check["range"]
    lines.append(f"\nHolds on {check['met_fraction']:.0%} of the range {lo:.0%}-{hi:.0%} (the interval from a "
                 "budget to the next is decided at its start).")
    return "\n".join(lines)


def frontier_plot(rows: list[dict], model: str, path: Path) -> None:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    series: dict = {}
    for r in rows:
        if r["family"] == "original":
            axes[0].axhline(r["ppl"], color="k", ls="--", lw=0.8, label="original (bf16 dense experts)")
            continue
        if r["bytes_ratio"] > RANGE[1] + 0.03:
            continue
        name = r["method"] if r["family"] == "tuckerize" else f"{r['method']} int{r['bits']}"
        series.setdefault((r["family"], name), []).append(r)
    for (family, name), pts in sorted(series.items()):
        pts.sort(key=lambda r: r["bytes_ratio"])
        xs = [100 * r["bytes_ratio"] for r in pts]
        style = dict(marker="s" if family == "tuckerize" else "o", lw=2 if family == "tuckerize" else 1,
                     mfc=None if family == "tuckerize" else "none", label=name)
        axes[0].plot(xs, [r["ppl"] for r in pts], **style)
        axes[1].plot(xs, [max(r["kl"], 1e-5) for r in pts], **style)
    for ax, label in ((axes[0], "perplexity (report split)"), (axes[1], "KL(original || row), report split")):
        ax.set_xlabel("routed-expert bytes, % of bf16 dense experts")
        ax.set_ylabel(label)
        ax.axvspan(100 * RANGE[0], 100 * RANGE[1], color="0.93", zorder=0)
        ax.grid(alpha=0.3)
    axes[1].set_yscale("log")
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{model}: the bytes frontier (shaded: 8%-30% of bf16; a small bench model: it flatters quantisation)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_frontier(key: str, rows: list[dict]) -> dict:
    check = frontier_check(rows)
    frontier_plot(rows, key, OUT / f"frontier_{key}.png")
    print(f"\n### {key}: every row (report split)\n\n{frontier_table(rows)}\n\n{check_table(check)}\n\n{CAVEAT}")
    return check


def hardness_table(frontier: dict[str, list[dict]]) -> str:
    """Round-to-nearest loss per model: perplexity of RTN int3 / int2 at groups 128, 64, 32 over
    the original's (report split), KL in brackets."""
    head = [(b, g) for b in (3, 2) for g in (128, 64, 32)]
    lines = ["| model | original ppl | " + " | ".join(f"RTN int{b} g{g}" for b, g in head) + " |",
             "|---|---:|" + "---:|" * len(head)]
    for key, rows in frontier.items():
        orig = next((r for r in rows if r["family"] == "original"), None)
        rtn = {(r["bits"], r["group"]): r for r in rows if r["method"] == "RTN"}
        if orig is None or not rtn:
            continue
        cells = [f"{rtn[k]['ppl'] / orig['ppl'] - 1:+.1%} ({rtn[k]['kl']:.3f})" if k in rtn else "" for k in head]
        lines.append(f"| {key} | {orig['ppl']:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report(files: list[Path]) -> None:
    """Merge result files (issue 11's runs, ``--only gptq/awq``, frontier runs): tables and plots."""
    models: dict = {}
    extras: dict = {}
    frontier: dict = {}
    for f in files:
        data = json.loads(f.read_text())
        for key, res in data["models"].items():
            if key not in MODELS and res.get("folder"):
                MODELS[key] = Path(res["folder"])
            if "frontier_rows" in res:
                have = {(r["method"], r["setting"]) for r in frontier.get(key, [])}
                frontier.setdefault(key, []).extend(r for r in res["frontier_rows"] if (r["method"], r["setting"])
                                                    not in have)
            if "rows" not in res and "extra_rows" not in res:
                continue
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
    OUT.mkdir(parents=True, exist_ok=True)
    for key, res in models.items():
        if not res["rows"]:
            continue
        order = {m: i for i, m in enumerate(ORDER)}
        res["rows"].sort(key=lambda r: (r["removed"] or 0, order.get(r["method"], 99)))
        plot(res, key, OUT / f"compare_{key}.png")
        print(f"\n### {key}\n")
        print(table(res, key))
    for key, rows in frontier.items():
        print_frontier(key, rows)
    if frontier:
        print(f"\n### Round-to-nearest loss (perplexity over the original's, KL)\n\n{hardness_table(frontier)}")

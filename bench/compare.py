"""Tucker against what users pick instead, at equal expert bytes (issues 11 and 23).

Two comparisons, on the demo models (tuckerize/demo/model = Qwen3-MoE, tuckerize/demo/mixtral
= Mixtral) and any model added with ``--model-folder KEY=FOLDER`` (scripts/train_demo.py):

* ``--frontier`` (issue 23): the bytes frontier from 8% to 30% of the bf16 dense experts.
  Baselines: round-to-nearest, GPTQ (llmcompressor) and HQQ at 2 and 3 bits (4 where it fits)
  with groups of 32, 64, 128, asymmetric, scales and zeros counted; tuckerize rows: the
  product asked for each budget (``bench/comparison/tucker.py``). Writes
  ``bench/out/frontier.json`` and ``bench/out/frontier_KEY.png``; prints every row and the
  "equal or fewer bytes" test per budget (``bench/comparison/frontier.py``).
* the default (issue 11): at 25%, 50%, 75% of the routed experts' bytes removed, calibrated
  Tucker (bf16 factors, and quantised factors chosen on the selection split), RTN int4/int3
  (group min(128, in_features)), pruning by routing frequency and by REAP saliency,
  frequency-weighted merging, per-expert SVD, plain and whitened (SVD-LLM).

Every row is written as a checkpoint (baselines: dense, with the dequantised / modified
experts) and scored by the product's evaluation code (``tuckerize.evaluate``: native runtime,
float32, perplexity, KL(original || row) on the original's top-256 plus a rest bucket, top-1
agreement). Bytes are counted as each row would be stored: quantised dense experts at their
bits per weight plus a float16 scale and zero per group (HQQ: as HQQ packs its codes, 3.2 bits
per weight at 3 bits; ``bench/comparison/quantisers.py``); Tucker from the manifest (codes +
float16 group scales); pruning and merging the experts kept; SVD both factors in bf16.

Text: calibration ``tuckerize/demo/calibration.txt`` (cut from the training plays); each
folder's ``heldout.txt`` (plays never trained on) in 199 windows of 256 tokens: windows 0-49
are the SELECTION split (every setting chosen: the Tucker settings per budget, factor dtypes,
the whitened-SVD ridge), windows 50-198 the REPORT split (the tables).

Our bench models are small and trained on a CPU: they have few of the outlier features of
real checkpoints and flatter weight quantisation (BENCHMARKS.md measures how much).

    python bench/compare.py --frontier                      # both demo models (~40 min each on 2 shared cores)
    python bench/compare.py --frontier --model-folder moe64=/work/models/moe64
    python bench/compare.py --frontier --methods rtn,hqq               # some methods only
    python bench/compare.py                                             # issue 11's table
    python bench/compare.py --only gptq                                 # GPTQ int4 rows (issue 11)
    python bench/compare.py --only awq                                  # AWQ int4 rows (issue 11)
    python bench/compare.py --only sensitivity                          # per-factor int4 sensitivity
    python bench/compare.py --report FILE.json ...                      # merge runs: tables, plots

GPTQ, AWQ and HQQ run in their own environment (``--baseline-python``, default
/work/venvs/compare/bin/python: ``python3 -m venv /work/venvs/compare &&
/work/venvs/compare/bin/pip install torch==2.13.0 llmcompressor hqq``). ``--model-folder``
folders are recorded in the result file, so ``--report`` finds them again.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from comparison.dense import Dense, clusters, merge, prune, svd  # noqa: E402,F401  (the bench's API)
from comparison.external import baseline_python, external_row  # noqa: E402
from comparison.frontier import BUDGETS, METHODS, Frontier  # noqa: E402
from comparison.issue11 import REMOVED, Bench  # noqa: E402
from comparison.protocol import MODELS, OUT, add_models  # noqa: E402
from comparison.quantisers import rtn  # noqa: E402,F401
from comparison.report import plot, print_frontier, report, table  # noqa: E402
from comparison.scoring import Scorer, collect_stats  # noqa: E402,F401
from comparison.tucker import TUCKER_SETTINGS  # noqa: E402

LLMCOMPRESSOR = {"gptq": "GPTQ int4 (llmcompressor)", "awq": "AWQ int4 (llmcompressor)"}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", help="comma-separated keys (default: qwen3,mixtral, or the --model-folder keys)")
    ap.add_argument("--model-folder", action="append", default=[], metavar="KEY=FOLDER",
                    help="add a model folder written by scripts/train_demo.py (repeatable)")
    ap.add_argument("--frontier", action="store_true", help="the bytes frontier, 8%% to 30%% of bf16 (issue 23)")
    ap.add_argument("--methods", default=",".join(METHODS),
                    help=f"frontier methods, comma-separated, of {','.join(METHODS)},awq")
    ap.add_argument("--frontier-budgets", default=",".join(map(str, BUDGETS)),
                    help="tuckerize budgets, fractions of the bf16 dense experts' bytes")
    ap.add_argument("--tucker-dtypes", help="tuckerize factor dtypes tried at each budget, ';'-separated "
                    "(default: int4;int8,core=int4;int8)")
    ap.add_argument("--work", type=Path, default=OUT / "compare_work")
    ap.add_argument("--json", type=Path, help="where the results go (default: bench/out/compare.json, "
                    "bench/out/frontier.json with --frontier)")
    ap.add_argument("--budgets", default=",".join(map(str, REMOVED)), help="fractions of expert bytes removed")
    ap.add_argument("--svd-ridge", type=float, help="whitened-SVD ridge (default: chosen on the selection split)")
    ap.add_argument("--skip-rtn", action="store_true", help="no RTN rows (when another run has them)")
    ap.add_argument("--skip-sensitivity", action="store_true", help="no per-factor int4 sensitivity runs")
    ap.add_argument("--only", choices=["gptq", "awq", "sensitivity"],
                    help="only the GPTQ / AWQ int4 rows of issue 11, or only the per-factor int4 sensitivity runs")
    ap.add_argument("--baseline-python", "--gptq-python", "--awq-python", dest="python",
                    help="python of the environment with llmcompressor and hqq "
                         "(default /work/venvs/compare/bin/python)")
    ap.add_argument("--gptq-samples", "--awq-samples", dest="samples", type=int, default=16,
                    help="GPTQ / AWQ calibration windows (llmcompressor's sequential pipeline is slow on 2 cores)")
    ap.add_argument("--report", type=Path, nargs="+", help="merge these result files into tables and plots")
    args = ap.parse_args(argv)
    args.json = args.json or OUT / ("frontier.json" if args.frontier else "compare.json")
    return args


def machine() -> dict:
    return {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "loadavg": os.getloadavg()}


def run_frontier(args, keys: list[str], log) -> None:
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(METHODS) - {"awq"})
    if unknown:
        raise SystemExit(f"--methods {','.join(unknown)}: unknown; known: {','.join(METHODS)},awq")
    python = baseline_python(args.python) if {"gptq", "hqq", "awq"} & set(methods) else None
    budgets = [float(b) for b in args.frontier_budgets.split(",")]
    settings = TUCKER_SETTINGS if not args.tucker_dtypes else tuple(
        {"factor_dtype": d} for d in args.tucker_dtypes.split(";") if d)
    result = {"machine": machine(), "command": "python bench/compare.py " + " ".join(sys.argv[1:]), "models": {}}
    args.json.with_suffix(".rows.jsonl").unlink(missing_ok=True)
    for key in keys:
        t = time.time()
        fr = Frontier(key, args.work, log, python, args.samples, args.json.with_suffix(".rows.jsonl"))
        result["models"][key] = fr.run(methods, budgets, settings)
        result["models"][key]["wall_seconds"] = round(time.time() - t, 1)
        args.json.write_text(json.dumps(result, indent=1, default=float))
        print_frontier(key, result["models"][key]["frontier_rows"])
    shutil.rmtree(args.work, ignore_errors=True)


def run_llmcompressor_int4(args, keys: list[str], log) -> None:
    """Issue 11's GPTQ / AWQ int4 rows (group min(128, in)), merged into its tables by --report."""
    python = baseline_python(args.python)
    res = {"command": "python bench/compare.py " + " ".join(sys.argv[1:]), "models": {}}
    for key in keys:
        args.work.mkdir(parents=True, exist_ok=True)
        d = Dense(MODELS[key])
        r = external_row(args.only, 4, 128, key=key, dense=d, scorer=Scorer(MODELS[key]), python=python,
                         work=args.work, log=log, samples=args.samples)
        r = {**r, "removed": None, "method": LLMCOMPRESSOR[args.only],
             "setting": f"asymmetric, group min(128, in), {args.samples} calibration windows"}
        res["models"][key] = {"folder": str(MODELS[key]), "extra_rows": [r]}
        args.json.write_text(json.dumps(res, indent=1, default=float))


def run_issue11(args, keys: list[str], log) -> None:
    result = {"machine": machine(), "command": "python bench/compare.py " + " ".join(sys.argv[1:]), "models": {}}
    if args.only == "sensitivity":
        for key in keys:
            bench = Bench(key, args.work, log, stats=False)
            result["models"][key] = {"folder": str(MODELS[key]), "baseline_select": bench.score.baseline("select"),
                                     "sensitivity": bench.sensitivity()}
            args.json.write_text(json.dumps(result, indent=1, default=float))
        shutil.rmtree(args.work, ignore_errors=True)
        return
    for key in keys:
        bench = Bench(key, args.work, log, args.json.with_suffix(".rows.jsonl"))
        result["models"][key] = {"folder": str(MODELS[key]),
                                 **bench.run(sensitivity=not args.skip_sensitivity,
                                             removed_list=[float(b) for b in args.budgets.split(",")],
                                             ridge=args.svd_ridge, rtn_rows=not args.skip_rtn)}
        plot(result["models"][key], key, OUT / f"compare_{key}.png")
        print(table(result["models"][key], key), flush=True)
        args.json.write_text(json.dumps(result, indent=1, default=float))
    shutil.rmtree(args.work, ignore_errors=True)


def main(argv=None) -> None:
    args = parse_args(argv)
    OUT.mkdir(parents=True, exist_ok=True)
    started = time.time()

    def log(msg: str) -> None:
        print(f"{time.time() - started:7.1f}s {msg}", flush=True)

    added = add_models(args.model_folder)
    if args.report:
        report(args.report)
        return
    keys = (args.models or ",".join(added) or "qwen3,mixtral").split(",")
    unknown = [k for k in keys if k not in MODELS]
    if unknown:
        raise SystemExit(f"--models {','.join(unknown)}: unknown; known: {', '.join(MODELS)} (add with --model-folder)")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    if args.frontier:
        run_frontier(args, keys, log)
    elif args.only in ("gptq", "awq"):
        run_llmcompressor_int4(args, keys, log)
    else:
        run_issue11(args, keys, log)
    log("done")


if __name__ == "__main__":
    main()

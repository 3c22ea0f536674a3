"""``tuckerize eval``: perplexity and accuracy of a Tucker model against the original.

Prints the report (:mod:`tuckerize.evaluate.report`) as a table and closes with one summary
line a newcomer reads (:func:`summary_line`): the routed experts' bytes the Tucker checkpoint
stores against bf16 dense experts and the original as stored, and the perplexity against the
original's on the same windows."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from tuckerize.cli import app, run_or_exit
from tuckerize.cli.ui import RichProgress, console, size, to_json
from tuckerize.parallel import leave_process_group


@app.command("eval")
def eval_(
    model: Annotated[str, typer.Option("--model", "-m", help="Tucker checkpoint or shard set (from `tuckerize shard`).")],
    baseline: Annotated[Optional[str], typer.Option(help="Original model folder or 'demo'. Default: the source in the Tucker manifest.")] = None,
    backend: Annotated[str, typer.Option(help="cpu (gloo), cuda (nccl) or npu (hccl).")] = "cpu",
    text: Annotated[Optional[str], typer.Option(help="Text file, 'demo' or 'wikitext2'. Default: the model's held-out text, else WikiText-2.")] = None,
    seqlen: Annotated[int, typer.Option(help="Window length in tokens (non-overlapping).")] = 2048,
    max_windows: Annotated[Optional[int], typer.Option(help="Score at most this many windows.")] = None,
    skip_windows: Annotated[int, typer.Option(help="Leave out the text's first N windows (e.g. text a setting was chosen on); windows are still cut from the first token.")] = 0,
    dtype: Annotated[str, typer.Option(help="float32, bfloat16 or float16.")] = "float32",
    runtime: Annotated[str, typer.Option(help="auto, native (tensor-parallel), hf (transformers, one process) or vllm (the vLLM plugin).")] = "auto",
    tp: Annotated[int, typer.Option("--tp", help="Tensor-parallel size of --runtime vllm (vLLM starts the ranks); the native runtime's is torchrun's --nproc-per-node.")] = 1,
    kl_topk: Annotated[int, typer.Option(help="Top-k of the original's distribution kept for KL (and cached).")] = 256,
    layer_tokens: Annotated[int, typer.Option(help="Tokens used for the per-layer MoE output error.")] = 512,
    tasks_jsonl: Annotated[Optional[list[str]], typer.Option("--tasks-jsonl", help="Local multiple-choice JSONL task (repeatable), scored as lm-eval scores multiple_choice.")] = None,
    tasks: Annotated[Optional[str], typer.Option(help="lm-eval-harness tasks, comma-separated: task names, or task YAML files or folders of them (data paths relative to the YAML).")] = None,
    task_limit: Annotated[Optional[int], typer.Option(help="At most this many examples per task.")] = None,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="Recompute the baseline instead of reusing a cached one.")] = False,
    no_verify: Annotated[bool, typer.Option("--no-verify", help="Skip the sha256 check of the model's files against its manifest (sizes are still checked).")] = False,
    allow_baseline_mismatch: Annotated[bool, typer.Option("--allow-baseline-mismatch", help="Compare against a baseline that is not the model the Tucker checkpoint was made from (a warning goes in the report).")] = False,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write the full report here.")] = None,
    plot: Annotated[Optional[Path], typer.Option(help="Write a PNG of per-layer error and the two perplexities.")] = None,
) -> None:
    """Perplexity, KL, top-1 agreement, per-layer error and task accuracy against the original model."""
    import os

    from tuckerize.evaluate import evaluate

    rank0 = int(os.environ.get("RANK", "0")) == 0
    # Output paths are checked before the work, so that a typo does not lose an evaluation.
    run_or_exit(lambda: (_check_output(json_out, "--json"), _check_output(plot, "--plot", needs="matplotlib")))
    done = False
    try:
        with RichProgress(enabled=rank0) as progress:
            report = run_or_exit(lambda: evaluate(
                model, baseline, text=text, seqlen=seqlen, max_windows=max_windows, skip_windows=skip_windows,
                backend=backend, dtype=dtype, runtime=runtime, kl_topk=kl_topk, layer_tokens=layer_tokens,
                tasks_jsonl=tasks_jsonl, tasks=[t for t in tasks.split(",") if t] if tasks else None,
                task_limit=task_limit,
                use_cache=not no_cache, verify=not no_verify, allow_baseline_mismatch=allow_baseline_mismatch,
                on_note=(lambda line: progress.bar.console.print(line, markup=False, highlight=False, soft_wrap=True)) if rank0
                else None, progress=progress, tensor_parallel=tp),
                interrupted="interrupted; no report was written. eval does not resume: rerun the command "
                            "(a baseline already computed is reused from the cache)")
        done = True
    finally:
        leave_process_group(done)
    if not rank0:
        return
    _print_table(report)
    run_or_exit(lambda: _write_reports(report, json_out, plot))
    console.print(summary_line(report), markup=False, highlight=False, soft_wrap=True)  # the closing line
    if runtime == "vllm":
        # vLLM 0.32 (CPU) can abort the interpreter's shutdown (a C++ thread still joinable:
        # "terminate called without an active exception", exit -6) after everything is written:
        # stop its engine (the atexit handlers, tuckerize.integrations.vllm.evaluate.open_llm),
        # then leave without finalisation.
        import atexit
        import sys

        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def _check_output(path: Optional[Path], flag: str, needs: Optional[str] = None) -> None:
    """A report path must be writable before the evaluation starts."""
    import importlib.util
    import os

    from tuckerize.errors import InputError

    if path is None:
        return
    if path.is_dir():
        raise InputError(f"{flag} {path} is a folder; pass a file name")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise InputError(f"{flag} {path}: folder {parent} does not exist; create it or choose another path")
    if not os.access(parent, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise InputError(f"{flag} {path} cannot be written (permission denied); choose another path")
    if needs and importlib.util.find_spec(needs) is None:
        raise InputError(f"{flag} needs the `{needs}` package: pip install 'tuckerize[eval]'")


def _write_reports(report: dict, json_out: Optional[Path], plot: Optional[Path]) -> None:
    """Report files, each written atomically (a temporary name renamed when complete)."""
    from tuckerize.checkpoint import atomic_write
    from tuckerize.errors import InputError, OutputError
    from tuckerize.evaluate import plot_report

    for path, write in ((json_out, lambda tmp: tmp.write_text(to_json(report))),
                        (plot, lambda tmp: plot_report(report, tmp))):
        if path is None:
            continue
        try:
            with atomic_write(path) as tmp:
                write(tmp)
        except OSError as exc:
            raise InputError(f"cannot write {path} ({exc.strerror}); the table above is the report; "
                             "choose another path and rerun") from None
        except OutputError as exc:  # mapped by the shared writer (disk full, read-only, below a file)
            raise OutputError(f"{exc}; the table above is the report") from None
    if json_out:
        console.print(f"report written to {json_out}")
    if plot:
        console.print(f"plot written to {plot}")


def _windows_phrase(t: dict) -> str:
    """``windows 50-198 of demo-heldout`` (``window 3`` when one)."""
    first, n = t.get("first_window", 0), t["windows"]
    return (f"window {first}" if n == 1 else f"windows {first}-{first + n - 1}") + f" of {t['source']}"


def _text_line(report: dict) -> str:
    t, s = report["text"], report["settings"]
    which = ""
    if t.get("windows_in_text") and (t.get("first_window", 0) or t["windows"] < t["windows_in_text"]):
        first = t.get("first_window", 0)
        which = f" (windows {first}-{first + t['windows'] - 1} of the text's {t['windows_in_text']})"
    return (f"text: {t['source']}: {t['tokens_in_text']:,} tokens, {t['windows']} windows of {s['seqlen']}{which}, "
            f"{t['tokens_scored']:,} tokens scored; {s['runtime']} runtime on {s['device']}, tp={s.get('tensor_parallel', s['world_size'])}")


def _bytes_rows(report: dict) -> list[tuple[str, str, str]]:
    """Table rows: the checkpoint's stored expert bytes against the original as stored and
    against bf16 dense experts; a shard set's all ranks together and per rank."""
    rows = []
    b = report.get("compression_bytes")
    if b:
        src, dense = b.get("experts_source"), b["experts_dense_bf16"]
        stored_as = "/".join((b.get("source_dtype") or {}).get("stored", []))
        original = f"{size(src)}" + (f" ({stored_as})" if stored_as else "") if src else ""
        rows.append(("expert bytes stored (checkpoint)", original, size(b["experts_stored"])))
        if src:
            rows.append(("  against the original as stored", "100%", f"{b['ratio_to_source']:.1%}"))
        rows.append((f"  against bf16 dense ({size(dense)})", f"{src / dense:.1%}" if src else "",
                     f"{b['ratio_to_bf16_dense']:.1%}"))
    sb = report.get("shard_bytes")
    if sb:
        per_rank = sb.get("experts_stored_per_rank") or []
        rows.append((f"shard set, tp={sb['tp']} {sb['layout']} layout: all ranks", "", size(sb["experts_stored"])))
        rows.append(("  against bf16 dense", "", f"{sb['ratio_to_bf16_dense']:.1%}"))
        if per_rank:
            rows.append(("  per rank", "", f"{size(per_rank[0])} each" if len(set(per_rank)) == 1
                         else ", ".join(size(r) for r in per_rank)))
    return rows


def _print_table(report: dict) -> None:
    from rich.table import Table

    console.print(_text_line(report))
    table = Table(title="original vs Tucker")
    table.add_column("metric")
    table.add_column("original", justify="right")
    table.add_column("Tucker", justify="right")
    b, k, f = report["baseline_result"], report["tucker_result"], report["fidelity"]
    table.add_row("perplexity", f"{b['perplexity']:.3f}" + (" (cached)" if b["cached"] else ""), f"{k['perplexity']:.3f}")
    table.add_row("perplexity ratio", "1", f"{report['perplexity_ratio']:.4f}")
    table.add_row("KL(original || Tucker) per token", "0", f"{f['kl_mean']:.4f}")
    table.add_row("top-1 agreement", "1", f"{f['top1_agreement']:.4f}")
    if b.get("tokens_per_s"):
        table.add_row("tokens / s", f"{b['tokens_per_s']:,.0f}", f"{k['tokens_per_s']:,.0f}")
    if report.get("compression"):
        table.add_row("expert parameters kept", "100%", f"{report['compression']['experts_ratio']:.1%}")
    for row in _bytes_rows(report):
        table.add_row(*row)
    if report.get("memory"):
        m = report["memory"]["experts_per_layer_bytes"]
        table.add_row(f"experts per MoE layer as loaded (rank {report['memory']['rank']})",
                      f"{m['dense_same_dtype'] / 2**20:.2f} MiB", f"{m['total'] / 2**20:.2f} MiB")
    for name, r in (report.get("tasks_jsonl") or {}).items():
        table.add_row(f"{name} acc", f"{r['baseline']['acc']:.3f}", f"{r['tucker']['acc']:.3f}")
    console.print(table)
    errs = f["layer_relative_error"]
    console.print("MoE block output error by layer: " + ", ".join(f"{l}: {e:.4f}" for l, e in errs.items()))


def _in_unit(*values: int) -> list[str]:
    """Byte counts in one unit (the largest value's: KiB, MiB or GiB), so that they compare at a glance."""
    unit, scale = next(((u, s) for u, s in (("GiB", 2**30), ("MiB", 2**20)) if max(values) >= s), ("KiB", 2**10))
    return [f"{v / scale:.{1 if unit == 'KiB' else 2}f} {unit}" for v in values]


def _change(ratio: float) -> str:
    import math

    return f"{ratio - 1:+.2%}" if math.isfinite(ratio) else "overflowed"


#: safetensors dtype names as the summary line says them (others, e.g. F8_E4M3, as they are)
_STORED_NAMES = {"F32": "float32", "BF16": "bf16", "F16": "float16"}


def summary_line(report: dict) -> str:
    """The one line a newcomer reads: the routed experts' bytes the Tucker checkpoint stores
    (what stays on disk) against bf16 dense experts and against the original as stored, the
    perplexity against the original's on the same windows, and for a shard set its bytes on
    all ranks together and per rank (a factor every rank holds counts on each)."""
    b, k = report["baseline_result"]["perplexity"], report["tucker_result"]["perplexity"]
    ppl = (f"perplexity {k:.2f} against {b:.2f} for the original ({_change(report['perplexity_ratio'])}) "
           f"on {_windows_phrase(report['text'])}")
    nb = report.get("compression_bytes")
    if not nb:
        return f"summary: {ppl} (no stored bytes recorded for this checkpoint)"
    src, dense, stored = nb.get("experts_source"), nb["experts_dense_bf16"], nb["experts_stored"]
    stored_s, dense_s, src_s = _in_unit(stored, dense, src or dense)
    source = ""
    if src:
        stored_as = "/".join(_STORED_NAMES.get(d, d) for d in (nb.get("source_dtype") or {}).get("stored", []))
        source = ("; the original stores them in bf16" if stored_as == "bf16"
                  else f"; {src_s} as the {stored_as + ' ' if stored_as else ''}original stores them")
    line = (f"summary: the Tucker checkpoint's routed experts take {stored_s} instead of {dense_s} in bf16 "
            f"({nb['ratio_to_bf16_dense']:.1%}{source}), {ppl}")
    sb = report.get("shard_bytes")
    if sb and sb.get("experts_stored_per_rank"):
        per_rank = sb["experts_stored_per_rank"]
        all_s, *rank_s = _in_unit(sb["experts_stored"], *per_rank)
        each = f"{rank_s[0]} each" if len(set(per_rank)) == 1 else "per rank " + ", ".join(rank_s)
        line += f"; the tp={sb['tp']} shard set: {all_s} on {sb['tp']} ranks together, {each}"
    return line



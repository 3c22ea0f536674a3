"""``tuckerize eval``: perplexity and accuracy of a Tucker model against the original."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from tuckerize.cli import app, run_or_exit
from tuckerize.cli.ui import RichProgress, console


@app.command("eval")
def eval_(
    model: Annotated[str, typer.Option("--model", "-m", help="Tucker checkpoint or shard set (from `tuckerize shard`).")],
    baseline: Annotated[Optional[str], typer.Option(help="Original model folder or 'demo'. Default: the source in the Tucker manifest.")] = None,
    backend: Annotated[str, typer.Option(help="cpu (gloo), cuda (nccl) or npu (hccl).")] = "cpu",
    text: Annotated[Optional[str], typer.Option(help="Text file, 'demo' or 'wikitext2'. Default: the model's held-out text, else WikiText-2.")] = None,
    seqlen: Annotated[int, typer.Option(help="Window length in tokens (non-overlapping).")] = 2048,
    max_windows: Annotated[Optional[int], typer.Option(help="Score at most this many windows.")] = None,
    dtype: Annotated[str, typer.Option(help="float32, bfloat16 or float16.")] = "float32",
    runtime: Annotated[str, typer.Option(help="auto, native (tensor-parallel), hf (transformers, one process) or vllm (the vLLM plugin).")] = "auto",
    kl_topk: Annotated[int, typer.Option(help="Top-k of the original's distribution kept for KL (and cached).")] = 256,
    layer_tokens: Annotated[int, typer.Option(help="Tokens used for the per-layer MoE output error.")] = 512,
    tasks_jsonl: Annotated[Optional[list[str]], typer.Option("--tasks-jsonl", help="Local multiple-choice JSONL task (repeatable).")] = None,
    tasks: Annotated[Optional[str], typer.Option(help="lm-eval-harness tasks, comma-separated (needs lm-eval).")] = None,
    task_limit: Annotated[Optional[int], typer.Option(help="At most this many examples per task.")] = None,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="Recompute the baseline instead of reusing a cached one.")] = False,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write the full report here.")] = None,
    plot: Annotated[Optional[Path], typer.Option(help="Write a PNG of per-layer error and the two perplexities.")] = None,
) -> None:
    """Perplexity, KL, top-1 agreement, per-layer error and task accuracy against the original model."""
    from tuckerize.evaluate import evaluate, plot_report

    rank0 = int(__import__("os").environ.get("RANK", "0")) == 0
    done = False
    try:
        with RichProgress(enabled=rank0) as progress:
            report = run_or_exit(lambda: evaluate(
                model, baseline, text=text, seqlen=seqlen, max_windows=max_windows, backend=backend, dtype=dtype,
                runtime=runtime, kl_topk=kl_topk, layer_tokens=layer_tokens, tasks_jsonl=tasks_jsonl,
                tasks=[t for t in tasks.split(",") if t] if tasks else None, task_limit=task_limit,
                use_cache=not no_cache, progress=progress))
        done = True
    finally:
        _leave_process_group(done)
    if not rank0:
        return
    if json_out:
        json_out.write_text(json.dumps(report, indent=2, default=str))
    if plot:
        plot_report(report, plot)
    from rich.table import Table

    t = report["text"]
    s = report["settings"]
    console.print(f"text: {t['source']}: {t['tokens_in_text']:,} tokens, {t['windows']} windows of {s['seqlen']}, "
                  f"{t['tokens_scored']:,} tokens scored; {s['runtime']} runtime on {s['device']}, tp={s['world_size']}")
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
    for name, r in (report.get("tasks_jsonl") or {}).items():
        table.add_row(f"{name} acc", f"{r['baseline']['acc']:.3f}", f"{r['tucker']['acc']:.3f}")
    console.print(table)
    errs = f["layer_relative_error"]
    console.print("MoE block output error by layer: " + ", ".join(f"{l}: {e:.4f}" for l, e in errs.items()))


def _leave_process_group(done: bool) -> None:
    """Leave torchrun's process group before the process exits (after a barrier when every
    rank finished): a gloo group left to interpreter teardown made ranks abort at exit
    ("terminate called without an active exception", exit code -6) after a good run."""
    import sys

    if "torch.distributed" not in sys.modules:
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if done:
            dist.barrier()
        dist.destroy_process_group()

"""``tuckerize decompose``: a Hugging Face MoE checkpoint to a Tucker checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from tuckerize.cli import app, run_or_exit
from tuckerize.cli.ui import RichProgress, bytes_line, console, print_json
from tuckerize.parallel import init_from_env, leave_process_group

Model = Annotated[str, typer.Option("--model", "-m", help="Hub id (e.g. Qwen/Qwen3-30B-A3B) or local folder; demo: the embedded demo model.")]


class DecomposeProgress(RichProgress):
    """The progress bars, plus one line when an earlier run is continued."""

    def start(self, task: str, total: int) -> None:
        if task == "resume":
            self.resume_total = total
        else:
            super().start(task, total)

    def advance(self, task: str, n: int = 1, **info) -> None:
        if task != "resume":
            super().advance(task, n, **info)
            return
        for name in info.get("damaged", []):
            console.print(f"{info['out']}/{name} is unreadable; redoing the files it recorded", soft_wrap=True,
                          markup=False, highlight=False)
        where = f"continuing from layer {info['layer']}" if info.get("layer") is not None else "nothing left to redo"
        if info.get("layer") == -1:
            where = "continuing from the non-layer tensors"
        console.print(f"resuming in {info['out']}: {n} of {self.resume_total} files kept from the earlier run; {where}",
                      soft_wrap=True, markup=False, highlight=False)

    def finish(self, task: str) -> None:
        if task != "resume":
            super().finish(task)


@app.command()
def decompose(
    model: Model = "demo",
    ranks: Annotated[Optional[str], typer.Option(help="r_E,r_H,r_I for every MoE layer and projection, e.g. 64,512,256.")] = None,
    ratio: Annotated[Optional[float], typer.Option(help="Fraction of routed-expert parameters to keep, in (0, 1]; ranks allocated per layer.")] = None,
    params: Annotated[Optional[int], typer.Option(help="Routed-expert parameters to keep (instead of --ratio).")] = None,
    bytes_budget: Annotated[Optional[float], typer.Option("--bytes", help="Store the routed experts in at most this fraction of their bf16 bytes, e.g. 0.15; ranks and storage (quantised base, Tucker, both) chosen per layer (method.bytes).")] = None,
    config: Annotated[Optional[Path], typer.Option(help="YAML rank plan and/or 'method:' settings (refit, sequential, ...: configs/method.yaml).")] = None,
    calibration: Annotated[Optional[str], typer.Option(help="Text (file, folder, .jsonl, hf:DATASET[:CONFIG[:SPLIT]], demo) or saved statistics (a folder holding calibration_stats.safetensors).")] = None,
    samples: Annotated[int, typer.Option(help="Calibration windows.")] = 128,
    seqlen: Annotated[int, typer.Option(help="Tokens per calibration window.")] = 512,
    factor_dtype: Annotated[Optional[str], typer.Option(help="float32, bf16, fp16, fp8, int8, int4 or per factor ('int8,core=int4'). Default: the source's dtype.")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Output folder. Default: <model>-tucker-<ranks>.")] = None,
    save_config: Annotated[Optional[Path], typer.Option(help="Also write an allocated rank plan here (always written to OUT/rank_plan.yaml).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Start over in an output folder tuckerize wrote (deletes only the files it recorded).")] = False,
    revision: Annotated[Optional[str], typer.Option(help="Hub revision (branch, tag or commit).")] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda[:N] or npu[:N].")] = "cpu",
    json_out: Annotated[bool, typer.Option("--json", help="Print the manifest as JSON.")] = False,
) -> None:
    """Decompose each MoE layer's stacked experts (E x H x I per projection) into U_E, U_H, U_I and a core.

    Under torchrun the layers and the calibration windows are divided among the processes; the result is the same.
    """
    import os

    from tuckerize.compress import decompose_checkpoint, load_method
    from tuckerize.demo import resolve_demo

    model_path = resolve_demo(model)
    parallel = None
    rank0 = int(os.environ.get("RANK", "0")) == 0
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:

        parallel, dev = run_or_exit(lambda: init_from_env(device))
        device = str(dev)

    def call():
        return decompose_checkpoint(
            model_path, out, ranks=ranks, config=config, ratio=ratio, params=params, bytes_budget=bytes_budget,
            revision=revision,
            device=device, overwrite=overwrite, progress=progress, calibration=calibration, samples=samples,
            seqlen=seqlen, method=load_method(config), save_config=save_config, factor_dtype=factor_dtype,
            parallel=parallel,
        )

    finished = False
    try:
        with DecomposeProgress(enabled=not json_out and rank0) as progress:
            manifest = run_or_exit(call)
        finished = True
    finally:
        if parallel is not None:
            leave_process_group(finished)
    if not rank0:
        return
    if json_out:
        print_json(manifest)
        return
    from rich.table import Table

    table = Table(title=f"Tucker decomposition of {manifest['source']['model']}")
    whitened = "calibration" in manifest and (manifest["calibration"].get("whitening") is not None)
    budget = "budget" in manifest["bytes"]
    cols = ["layer", "projection", "stored as" if budget else "ranks (r_E, r_H, r_I)", "rel. error"]
    cols += ["output error"] if whitened else []
    for col in cols + ["bytes" if budget else "params", "seconds"]:
        table.add_column(col, justify="right")
    for t in manifest["tensors"]:
        row = [str(t["layer"]), t["projection"], form_text(t) if budget else ",".join(map(str, t["ranks"])),
               f"{t['relative_error']:.4f}"]
        row += [f"{t['whitened_error']:.4f}"] if whitened else []
        table.add_row(*row, f"{t['bytes' if budget else 'params']:,}", f"{t['seconds']:.2f}")
    console.print(table)
    for line in summary_lines(manifest):
        console.print(line, soft_wrap=True, markup=False, highlight=False)


def form_text(t: dict) -> str:
    """``int2 g128 base + Tucker 16,8,8 int4``: a projection's stored form (``--bytes``)."""
    parts = []
    if t.get("base"):
        parts.append(f"int{t['base']['bits']} g{t['base']['group']} base")
    if t.get("ranks"):
        parts.append(f"Tucker {','.join(map(str, t['ranks']))} {t.get('storage') or ''}".strip())
    return " + ".join(parts)


def budget_line(b: dict) -> str:
    """How a ``--bytes`` budget was spent, in one line."""
    u = b["budget"]
    forms = ", ".join(f"{n} {k}" for k, n in sorted(u["forms"].items()))
    return (f"--bytes {u['fraction']:g}: {u['stored']:,} of {u['bytes']:,} bytes budgeted "
            f"({u['stored'] / b['experts_dense_bf16']:.2%} of the bf16 dense experts; the smallest storable form "
            f"{u['smallest_feasible_fraction']:.2%}); projections stored as {forms}")


def summary_lines(manifest: dict) -> list[str]:
    """The closing lines of ``tuckerize decompose``: the plan, parameters, expert bytes
    against the source as stored and against bf16, where it was written."""
    from tuckerize.compress import PLAN_NAME

    lines = []
    if "allocation" in manifest:
        also = manifest["allocation"].get("config")
        lines.append(f"rank plan written to {Path(manifest['out']) / PLAN_NAME}" + (f" and {also}" if also else "")
                     + " (reuse with --config)")
    p = manifest["params"]
    b = manifest["bytes"]
    if "budget" in b:  # values of mixed widths (2-bit codes, int4 factors): the bytes line says the size
        lines.append(f"experts: {p['experts_before']:,} weights stored as {p['experts_after']:,} values (codes of "
                     f"quantised bases and Tucker parameters, of mixed widths: the bytes below are the size); "
                     f"{manifest['wall_seconds']:.1f} s")
    else:
        lines.append(f"experts: {p['experts_before']:,} -> {p['experts_after']:,} parameters "
                     f"({p['experts_ratio']:.1%} kept, {1 / p['experts_ratio']:.1f}x smaller); "
                     f"whole model {p['model_ratio']:.1%} kept; {manifest['wall_seconds']:.1f} s")
    if "budget" in b:
        lines += [budget_line(b), f"{bytes_line(b)}", f"written to {manifest['out']}"]
        return lines
    dtypes = sorted(set(b["dtypes"].values()))
    stored_as = dtypes[0] if len(dtypes) == 1 else ", ".join(f"{k} {v}" for k, v in b["dtypes"].items())
    why = "the source's dtype" if b.get("dtypes_from") == "source" else "as asked"
    lines.append(f"{bytes_line(b)}; factors {stored_as} ({why})")
    lines.append(f"written to {manifest['out']}")
    return lines

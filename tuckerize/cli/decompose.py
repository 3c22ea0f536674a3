"""``tuckerize decompose``: a Hugging Face MoE checkpoint to a Tucker checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from tuckerize.cli import app, run_or_exit
from tuckerize.cli.ui import RichProgress, console, print_json

Model = Annotated[str, typer.Option("--model", "-m", help="Hub id (e.g. Qwen/Qwen3-30B-A3B) or local folder. Default: the embedded demo model.")]


@app.command()
def decompose(
    model: Model = "demo",
    ranks: Annotated[Optional[str], typer.Option(help="r_E,r_H,r_I for every MoE layer and projection, e.g. 64,512,256.")] = None,
    config: Annotated[Optional[Path], typer.Option(help="YAML rank plan with per-layer/projection overrides (configs/).")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Output folder. Default: <model>-tucker-<ranks>.")] = None,
    revision: Annotated[Optional[str], typer.Option(help="Hub revision (branch, tag or commit).")] = None,
    iters: Annotated[int, typer.Option(help="HOOI sweeps after ST-HOSVD (0: ST-HOSVD only).")] = 0,
    device: Annotated[str, typer.Option(help="cpu, cuda[:N] or npu[:N].")] = "cpu",
    overwrite: Annotated[bool, typer.Option(help="Start over in an existing output folder.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the manifest as JSON instead of a table.")] = False,
) -> None:
    """Decompose each MoE layer's stacked experts (E x H x I per projection) into U_E, U_H, U_I and a core."""
    from tuckerize.compress import decompose_checkpoint
    from tuckerize.demo import resolve_demo

    model_path = resolve_demo(model)
    with RichProgress(enabled=not json_out) as progress:
        manifest = run_or_exit(
            lambda: decompose_checkpoint(
                model_path, out, ranks=ranks, config=config, revision=revision, iters=iters,
                device=device, overwrite=overwrite, progress=progress,
            )
        )
    if json_out:
        print_json(manifest)
        return
    from rich.table import Table

    table = Table(title=f"Tucker decomposition of {manifest['source']['model']}")
    for col in ("layer", "projection", "ranks (r_E, r_H, r_I)", "rel. error", "params", "seconds"):
        table.add_column(col, justify="right")
    for t in manifest["tensors"]:
        table.add_row(str(t["layer"]), t["projection"], ",".join(map(str, t["ranks"])),
                      f"{t['relative_error']:.4f}", f"{t['params']:,}", f"{t['seconds']:.2f}")
    console.print(table)
    p = manifest["params"]
    console.print(
        f"experts: {p['experts_before']:,} -> {p['experts_after']:,} parameters "
        f"({p['experts_ratio']:.1%} kept, {1 / p['experts_ratio']:.1f}x smaller); "
        f"whole model {p['model_ratio']:.1%} kept; {manifest['wall_seconds']:.1f} s"
    )
    console.print(f"written to {manifest['out']}")

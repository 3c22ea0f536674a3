"""``tuckerize shard``: pre-slice a Tucker checkpoint per tensor-parallel rank."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from tuckerize.cli import app, run_or_exit
from tuckerize.cli.ui import RichProgress, console, print_json


@app.command()
def shard(
    tucker: Annotated[Path, typer.Argument(help="Tucker checkpoint folder written by `tuckerize decompose`.")],
    tp: Annotated[int, typer.Option("--tp", help="Tensor-parallel world size.")] = 2,
    layout: Annotated[str, typer.Option(help="intermediate (U_I rows split) or expert (experts split).")] = "intermediate",
    out: Annotated[Optional[Path], typer.Option(help="Output folder. Default: <tucker>-tp<N>-<layout>.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing shard set.")] = False,
    no_verify: Annotated[bool, typer.Option("--no-verify", help="Skip the source's sha256 check (sizes are still checked).")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the shard manifest as JSON.")] = False,
) -> None:
    """Write one safetensors set per rank holding only that rank's slices."""
    from tuckerize.shard import shard_checkpoint

    with RichProgress(enabled=not json_out) as progress:
        manifest = run_or_exit(
            lambda: shard_checkpoint(tucker, tp, layout=layout, out=out, overwrite=overwrite,
                                     verify=not no_verify, progress=progress),
            interrupted="interrupted; no shard set was written: rerun the command",
        )
    if json_out:
        print_json(manifest)
        return
    sizes = [sum(f["bytes"] for f in r["files"].values()) for r in manifest["ranks"]]
    console.print(
        f"{manifest['tp']} ranks, layout {manifest['layout']}: "
        + ", ".join(f"rank {i} {s / 2**20:.1f} MiB" for i, s in enumerate(sizes))
    )
    console.print(f"written to {manifest['out']}")

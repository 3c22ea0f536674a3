"""``tuckerize shard``: pre-slice a Tucker checkpoint per tensor-parallel rank."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from tuckerize.cli import app, run_or_exit
from tuckerize.cli.ui import RichProgress, bytes_line, console, print_json


@app.command()
def shard(
    tucker: Annotated[Optional[Path], typer.Argument(help="Tucker checkpoint folder (same as --model).", show_default=False)] = None,
    model: Annotated[Optional[Path], typer.Option("--model", "-m", help="Tucker checkpoint folder written by `tuckerize decompose`.")] = None,
    tp: Annotated[int, typer.Option("--tp", help="Tensor-parallel world size.")] = 2,
    layout: Annotated[Optional[str], typer.Option(help="intermediate (U_I rows split), expert (experts split), hybrid (every term split) or hybrid-replicated-out (hybrid with U_H of down replicated: less to send at large ranks). Default: the one with the fewest multiply-adds per rank, among those sending no more than dense TP, for this model and tp.")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Output folder. Default: <tucker>-tp<N>-<layout>.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing shard set.")] = False,
    no_verify: Annotated[bool, typer.Option("--no-verify", help="Skip the source's sha256 check (sizes are still checked).")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the shard manifest as JSON.")] = False,
) -> None:
    """Write one safetensors set per rank holding only that rank's slices."""
    from tuckerize.errors import InputError
    from tuckerize.shard import shard_checkpoint

    def run():
        if tucker is not None and model is not None and Path(tucker) != Path(model):
            raise InputError(f"two checkpoints given ({tucker} and --model {model}); give one")
        folder = model if model is not None else tucker
        if folder is None:
            raise InputError("no Tucker checkpoint given; pass --model FOLDER (or the folder as an argument)")
        return shard_checkpoint(folder, tp, layout=layout, out=out, overwrite=overwrite, verify=not no_verify,
                                progress=progress)

    with RichProgress(enabled=not json_out) as progress:
        manifest = run_or_exit(run, interrupted="interrupted; no shard set was written: rerun the command")
    if json_out:
        print_json(manifest)
        return
    sizes = [sum(f["bytes"] for f in r["files"].values()) for r in manifest["ranks"]]
    chosen = manifest.get("layout_choice")
    if chosen:
        sent = chosen["sent_per_token"]
        console.print(f"layout {manifest['layout']}: the fewest multiply-adds per rank among layouts sending no more "
                      f"than dense TP at tp={manifest['tp']} (per token: "
                      + ", ".join(f"{k} {v / 1e6:.2f}M MACs, {sent[k]:,.0f} sent" for k, v in chosen["macs_per_token"].items())
                      + ")")
    moved = {L: a for L, a in (manifest.get("expert_assignment") or {}).items() if a["assigned"]}
    if moved:
        console.print(f"experts assigned to ranks by measured load in {len(moved)} layers (busiest rank above "
                      f"the mean: {max(a['imbalance_contiguous'] for a in moved.values()):.0%} contiguous -> "
                      f"{max(a['imbalance'] for a in moved.values()):.0%})")
    console.print(
        f"{manifest['tp']} ranks, layout {manifest['layout']}: "
        + ", ".join(f"rank {i} {s / 2**20:.1f} MiB" for i, s in enumerate(sizes))
    )
    console.print("Tucker experts per MoE layer, as stored: "
                  + ", ".join(f"rank {i} {b / 2**20:.2f} MiB" for i, b in enumerate(manifest["expert_bytes_per_layer"])))
    console.print(bytes_line(manifest["bytes"], "expert bytes of all ranks together (a factor every rank holds "
                             "counts on each)"), soft_wrap=True, markup=False, highlight=False)
    console.print(f"written to {manifest['out']}")

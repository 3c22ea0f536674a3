"""``tuckerize serve``: check a Tucker checkpoint, then serve it with vLLM's OpenAI-compatible server."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from tuckerize.cli import app, run_or_exit
from tuckerize.cli.ui import RichProgress, console


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def serve(
    ctx: typer.Context,
    checkpoint: Annotated[Path, typer.Argument(help="Tucker checkpoint folder written by `tuckerize decompose` (first).", show_default=False)],
    tp: Annotated[Optional[int], typer.Option("--tp", help="Tensor-parallel size (vLLM's --tensor-parallel-size).")] = None,
    no_verify: Annotated[bool, typer.Option("--no-verify", help="Skip the sha256 check of the checkpoint's files, here and inside vLLM (sizes are still checked).")] = False,
) -> None:
    """Check CHECKPOINT (files, tucker section, architecture, vLLM version), then run
    `vllm serve CHECKPOINT` in the foreground; every other option goes to vLLM unchanged
    (e.g. --host, --port, --dtype, --max-model-len, --enforce-eager)."""
    from tuckerize.integrations.vllm.serve import check_servable, exec_vllm

    with RichProgress() as progress:
        plan = run_or_exit(lambda: check_servable(checkpoint, tp=tp, vllm_args=ctx.args, verify=not no_verify,
                                                  progress=progress),
                           interrupted="interrupted before vLLM started; rerun the command")
    console.print(f"tuckerize: {plan.describe()}", markup=False, highlight=False, soft_wrap=True)
    console.print("tuckerize: starting " + " ".join(plan.command), markup=False, highlight=False, soft_wrap=True)
    exec_vllm(plan)

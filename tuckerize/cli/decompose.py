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
    ratio: Annotated[Optional[float], typer.Option(help="Fraction of routed-expert parameters to keep, in (0, 1]; ranks are allocated per layer and projection.")] = None,
    params: Annotated[Optional[int], typer.Option(help="Routed-expert parameters to keep (instead of --ratio).")] = None,
    calibration: Annotated[Optional[str], typer.Option(help="Calibration text: a text file, a folder of .txt files, a .jsonl with 'text', hf:DATASET[:CONFIG[:SPLIT]], or 'demo'. Enables whitened Tucker.")] = None,
    samples: Annotated[int, typer.Option(help="Calibration windows.")] = 128,
    seqlen: Annotated[int, typer.Option(help="Tokens per calibration window.")] = 512,
    stats: Annotated[Optional[Path], typer.Option(help="Reuse saved calibration statistics (calibration_stats.safetensors or the output folder holding it).")] = None,
    whiten: Annotated[bool, typer.Option(help="Whiten by the calibration statistics (--no-whiten: plain Tucker, statistics used for allocation only).")] = True,
    sequential: Annotated[bool, typer.Option(help="Calibrate each layer on the outputs of the already compressed layers.")] = False,
    expert_rank: Annotated[str, typer.Option(help="With --ratio/--params: 'full' keeps r_E = number of experts, 'auto' allocates it too.")] = "full",
    whitening: Annotated[str, typer.Option(help="'expert': per-expert output weights on the intermediate side, alternating least squares (default); 'pooled': one whitening per mode, closed form.")] = "expert",
    damp: Annotated[Optional[float], typer.Option(help="Ridge of the decomposition's weights, relative to each covariance's mean eigenvalue (default 0.1 expert, 1 pooled).")] = None,
    als_iters: Annotated[int, typer.Option(help="Alternation sweeps of --whitening expert.")] = 3,
    expert_hidden: Annotated[bool, typer.Option(help="--whitening expert with each expert's own hidden covariance (E x H x H per layer: small models).")] = False,
    alloc_damp: Annotated[Optional[float], typer.Option(help="Whitening ridge of the spectra that --ratio/--params allocation compares (default 10).")] = None,
    refit: Annotated[bool, typer.Option(help="Refit each expert's core to its own routed calibration data (needs --calibration; one more pass per layer).")] = False,
    factor_dtype: Annotated[str, typer.Option(help="Storage of factors and cores: float32 (default), bf16, fp8, int8 or int4 (group-wise float16 scales), or per factor, e.g. 'int8,core=int4'.")] = "float32",
    save_config: Annotated[Optional[Path], typer.Option(help="Where to write the allocated rank plan (default configs/<model>-keep<ratio>.yaml).")] = None,
) -> None:
    """Decompose each MoE layer's stacked experts (E x H x I per projection) into U_E, U_H, U_I and a core."""
    from tuckerize.compress import decompose_checkpoint
    from tuckerize.demo import resolve_demo

    model_path = resolve_demo(model)

    def call():
        from tuckerize.calibrate import WhitenOptions
        from tuckerize.errors import CalibrationError

        for name, value in (("--damp", damp), ("--alloc-damp", alloc_damp)):
            if value is not None and not value > 0:
                raise CalibrationError(f"{name} {value} must be positive (a ridge relative to the mean eigenvalue, e.g. 1)")
        return decompose_checkpoint(
            model_path, out, ranks=ranks, config=config, ratio=ratio, params=params, revision=revision, iters=iters,
            device=device, overwrite=overwrite, progress=progress, calibration=calibration, samples=samples,
            seqlen=seqlen, stats=stats, whiten=whiten, sequential=sequential, expert_rank=expert_rank,
            whiten_options=WhitenOptions(method=whitening, damp=damp, iters=als_iters, expert_hidden=expert_hidden),
            per_expert_stats=expert_hidden, save_config=save_config, alloc_damp=alloc_damp, refit=refit,
            factor_dtype=factor_dtype,
        )

    with RichProgress(enabled=not json_out) as progress:
        manifest = run_or_exit(call)
    if json_out:
        print_json(manifest)
        return
    from rich.table import Table

    table = Table(title=f"Tucker decomposition of {manifest['source']['model']}")
    whitened = "calibration" in manifest and (manifest["calibration"].get("whitening") is not None)
    cols = ["layer", "projection", "ranks (r_E, r_H, r_I)", "rel. error"]
    cols += ["output error"] if whitened else []
    for col in cols + ["params", "seconds"]:
        table.add_column(col, justify="right")
    for t in manifest["tensors"]:
        row = [str(t["layer"]), t["projection"], ",".join(map(str, t["ranks"])), f"{t['relative_error']:.4f}"]
        row += [f"{t['whitened_error']:.4f}"] if whitened else []
        table.add_row(*row, f"{t['params']:,}", f"{t['seconds']:.2f}")
    console.print(table)
    if "allocation" in manifest:
        console.print(f"rank plan written to {manifest['allocation']['config']} (reuse with --config)")
    p = manifest["params"]
    console.print(
        f"experts: {p['experts_before']:,} -> {p['experts_after']:,} parameters "
        f"({p['experts_ratio']:.1%} kept, {1 / p['experts_ratio']:.1f}x smaller); "
        f"whole model {p['model_ratio']:.1%} kept; {manifest['wall_seconds']:.1f} s"
    )
    if "bytes" in manifest:
        b = manifest["bytes"]
        console.print(f"expert bytes: {b['experts_stored']:,} stored ({b['ratio_to_bf16_dense']:.1%} of bf16 dense experts, "
                      f"{b['experts_dense_bf16']:,}); factors {b['dtypes']}")
    console.print(f"written to {manifest['out']}")

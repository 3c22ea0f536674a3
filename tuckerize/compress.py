"""Checkpoint to Tucker checkpoint, one decoder layer at a time.

:func:`decompose_checkpoint` is what ``tuckerize decompose`` calls. Peak memory is
one stacked projection (``E*H*I`` float32) plus its decomposition workspace and one
layer's non-expert tensors; it does not grow with the number of layers.

Resuming: after each output file is renamed into place, a journal records its
sha256 together with a fingerprint of the run (source files, ranks, settings).
A rerun with the same fingerprint skips every file whose checksum still matches;
the manifest is written last and marks the folder complete.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import time
from pathlib import Path
from typing import Any

from tuckerize import __version__
from tuckerize.arch import FACTORS, PROJECTIONS, moe_spec
from tuckerize.checkpoint import (
    INDEX_NAME,
    SIDE_FILES,
    Checkpoint,
    ModelSource,
    layer_of,
    load_config,
    resolve_model,
    save_safetensors,
    sha256_file,
    write_json,
)
from tuckerize.errors import OutputConflictError, RankError
from tuckerize.experts import expert_tensor_names, stack_projection
from tuckerize.format import (
    CONFIG_KEY,
    FORMAT_VERSION,
    JOURNAL_NAME,
    MANIFEST_NAME,
    factor_name,
    unit_file,
)
from tuckerize.progress import Progress, ensure
from tuckerize.ranks import RankPlan, load_plan, uniform_plan

#: HOOI sweeps after ST-HOSVD. Measured (BENCHMARKS.md): on expert tensors a sweep
#: lowers the relative error by well under 1% of itself at about 1.6x the HOSVD cost,
#: so the default is the HOSVD alone; ``--iters`` buys the last bit of error.
DEFAULT_ITERS = 0


def default_out(model: str, plan: RankPlan) -> Path:
    stem = re.sub(r"[^\w.\-]+", "-", Path(model.rstrip("/")).name if Path(model).exists() else model.replace("/", "--"))
    if plan.default is not None and not plan.projections and not plan.layers and not plan.layer_projections:
        tag = "-".join(map(str, plan.default))
    else:
        tag = Path(plan.source).stem if plan.source != "--ranks" else "custom"
    return Path(f"{stem}-tucker-{tag}")


def _device(name: str):
    from tuckerize.devices import resolve_device

    return resolve_device(name)


def _prepare_out(out: Path, fingerprint: dict[str, Any], overwrite: bool) -> dict[str, Any]:
    """Create or validate the output folder; return the journal of files already done."""
    if out.exists() and not out.is_dir():
        raise OutputConflictError(f"--out {out} is a file; choose a folder path")
    ours = out.is_dir() and ((out / JOURNAL_NAME).is_file() or (out / MANIFEST_NAME).is_file())
    if out.is_dir() and any(out.iterdir()) and not ours:
        raise OutputConflictError(
            f"output folder {out} exists and is not a tuckerize checkpoint; choose another --out or remove it"
        )
    if ours and overwrite:
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    if ours and not overwrite:
        for name in (JOURNAL_NAME, MANIFEST_NAME):
            path = out / name
            if path.is_file():
                previous = json.loads(path.read_text())
                if previous.get("fingerprint") != fingerprint:
                    raise OutputConflictError(
                        f"{out} holds a decomposition with other settings or another source; "
                        "pass --overwrite to start over or choose another --out"
                    )
                return previous.get("files", {})
    return {}


def _verified(out: Path, entry: dict[str, Any] | None) -> bool:
    if not entry:
        return False
    path = out / entry["file"]
    return path.is_file() and path.stat().st_size == entry["bytes"] and sha256_file(path) == entry["sha256"]


def decompose_checkpoint(
    model: str,
    out: str | Path | None = None,
    *,
    ranks: str | tuple[int, int, int] | None = None,
    config: str | Path | None = None,
    revision: str | None = None,
    iters: int = DEFAULT_ITERS,
    tol: float = 1e-4,
    device: str = "cpu",
    overwrite: bool = False,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Decompose every MoE layer of ``model`` and write a self-contained Tucker checkpoint.

    Parameters
    ----------
    model : hub id or local folder of a Hugging Face MoE checkpoint.
    out : output folder (default: ``<model>-tucker-<ranks>`` in the working directory).
    ranks : ``"r_E,r_H,r_I"`` for every layer and projection, or
    config : a YAML rank plan (see :mod:`tuckerize.ranks`).
    iters : HOOI sweeps after ST-HOSVD.
    device : ``cpu``, ``cuda`` (or ``cuda:N``) or ``npu``.

    Returns the manifest (also written to ``out/tuckerize_manifest.json``).
    """
    import torch

    from tuckerize.decompose import tucker

    started = time.time()
    progress = ensure(progress)
    if (ranks is None) == (config is None):
        raise RankError("give exactly one of --ranks r_E,r_H,r_I or --config FILE.yaml")
    plan = uniform_plan(ranks) if ranks is not None else load_plan(config)  # type: ignore[arg-type]
    if iters < 0:
        raise RankError(f"--iters {iters} is negative; use 0 (ST-HOSVD only) or a positive number of HOOI sweeps")
    dev = _device(device)

    source: ModelSource = resolve_model(model, revision)
    src_config = load_config(source.path)
    spec = moe_spec(src_config)
    plan.check(spec.moe_layers, spec.shape)
    ckpt = Checkpoint.open(source.path)

    # Which source tensors each output unit holds: unit 0 everything outside decoder
    # layers, unit L+1 decoder layer L.
    replaced = {layer: expert_tensor_names(ckpt, spec, layer) for layer in spec.moe_layers}
    replaced_set = {n for names in replaced.values() for n in names}
    units_of: dict[int, list[str]] = {}
    for name in ckpt.keys():
        if name in replaced_set:
            continue
        layer = layer_of(name)
        units_of.setdefault(0 if layer is None else layer + 1, []).append(name)
    n_units = max([spec.num_layers] + [u for u in units_of]) + 1
    for layer in spec.moe_layers:
        units_of.setdefault(layer + 1, [])

    progress.start("hash", len(ckpt.files))
    source_files = {}
    for f in ckpt.files:
        source_files[f] = sha256_file(source.path / f)
        progress.advance("hash", file=f)
    progress.finish("hash")

    settings = {
        "algorithm": "st-hosvd" + ("+hooi" if iters else ""),
        "mode_order": "cheapest",
        "hooi_iters": iters,
        "hooi_tol": tol,
        "compute_dtype": "float32",
        "eigensolver": "float64 symmetric (Gram matrices)",
        "factor_dtype": "float32",
    }
    layer_ranks = {
        str(layer): {p: list(plan.ranks_for(layer, p)) for p in PROJECTIONS} for layer in spec.moe_layers
    }
    fingerprint = {
        "format_version": FORMAT_VERSION,
        "source_files": source_files,
        "ranks": layer_ranks,
        "settings": settings,
    }
    out = Path(out) if out is not None else default_out(model, plan)
    done = _prepare_out(out, fingerprint, overwrite)

    journal: dict[str, Any] = {"fingerprint": fingerprint, "files": {}}
    units = sorted(units_of)
    total_steps = sum(len(PROJECTIONS) if (u - 1) in spec.moe_layers else 1 for u in units)
    progress.start("decompose", total_steps)
    weight_map: dict[str, str] = {}
    for unit in units:
        filename = unit_file(unit, n_units)
        layer = unit - 1
        is_moe = layer in spec.moe_layers
        steps = len(PROJECTIONS) if is_moe else 1
        entry = done.get(filename)
        if _verified(out, entry):
            journal["files"][filename] = entry
            weight_map.update({n: filename for n in entry["tensors"]})
            progress.advance("decompose", steps, layer=layer, skipped=True)
            continue
        t0 = time.time()
        tensors = {name: ckpt.get(name) for name in units_of[unit]}
        errors: dict[str, Any] = {}
        if is_moe:
            prefix = spec.arch.experts_prefix(layer)
            for proj in PROJECTIONS:
                tp = time.time()
                stacked = stack_projection(ckpt, spec, layer, proj).to(dev)
                result = tucker(stacked, plan.ranks_for(layer, proj), n_iter_max=iters, tol=tol)
                del stacked
                for fname, value in zip(FACTORS, [*result.factors, result.core]):
                    tensors[factor_name(prefix, proj, fname)] = value.to("cpu", torch.float32).contiguous()
                errors[proj] = {
                    "ranks": list(result.rank),
                    "relative_error": result.relative_error,
                    "error_history": result.error_history,
                    "seconds": round(time.time() - tp, 3),
                }
                progress.advance("decompose", 1, layer=layer, projection=proj, error=result.relative_error)
        save_safetensors(tensors, out / filename, metadata={"format": "pt"})
        journal["files"][filename] = {
            "file": filename,
            "layer": layer if unit else None,
            "tensors": sorted(tensors),
            "bytes": (out / filename).stat().st_size,
            "sha256": sha256_file(out / filename),
            "errors": errors,
            "seconds": round(time.time() - t0, 3),
        }
        weight_map.update({n: filename for n in tensors})
        del tensors
        write_json(out / JOURNAL_NAME, journal)
        if not is_moe:
            progress.advance("decompose", 1, layer=layer)
    progress.finish("decompose")

    for name in SIDE_FILES:
        if (source.path / name).is_file():
            shutil.copyfile(source.path / name, out / name)

    E, H, I = spec.shape
    tucker_layers = {
        str(layer): {
            p: {"ranks": layer_ranks[str(layer)][p], "shape": [E, H, I]} for p in PROJECTIONS
        }
        for layer in spec.moe_layers
    }
    out_config = dict(src_config)
    out_config[CONFIG_KEY] = {
        "format_version": FORMAT_VERSION,
        "architecture": spec.arch.name,
        "axes": "W[e, h, i] = sum core[a, b, c] U_E[e, a] U_H[h, b] U_I[i, c]; gate/up/down share (E, H, I)",
        "factors": list(FACTORS),
        "layers": tucker_layers,
    }
    write_json(out / "config.json", out_config)
    total_size = sum((out / e["file"]).stat().st_size for e in journal["files"].values())
    write_json(out / INDEX_NAME, {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))})

    dense_expert = 3 * E * H * I * len(spec.moe_layers)
    tucker_expert = 0
    per_tensor = []
    for entry in journal["files"].values():
        for proj, info in entry["errors"].items():
            rE, rH, rI = info["ranks"]
            count = E * rE + H * rH + I * rI + rE * rH * rI
            tucker_expert += count
            per_tensor.append({"layer": entry["layer"], "projection": proj, **info, "params": count})
    per_tensor.sort(key=lambda d: (d["layer"], PROJECTIONS.index(d["projection"])))
    total_before = sum(math.prod(ckpt.shape(n)) for n in ckpt.keys())
    total_after = total_before - dense_expert + tucker_expert
    manifest = {
        "tool": "tuckerize",
        "version": __version__,
        "fingerprint": fingerprint,
        "source": {
            "model": source.label,
            "path": str(source.path),
            "hub_id": source.hub_id,
            "revision": source.revision,
            "files_sha256": source_files,
        },
        "out": str(out.resolve()),
        "architecture": spec.arch.name,
        "moe": {"layers": list(spec.moe_layers), "experts": E, "top_k": spec.top_k, "hidden": H, "intermediate": I},
        "rank_plan": plan.to_dict(),
        "settings": settings,
        "tensors": per_tensor,
        "params": {
            "experts_before": dense_expert,
            "experts_after": tucker_expert,
            "experts_ratio": tucker_expert / dense_expert,
            "model_before": total_before,
            "model_after": total_after,
            "model_ratio": total_after / total_before,
        },
        "files": journal["files"],
        "wall_seconds": round(time.time() - started, 3),
    }
    write_json(out / MANIFEST_NAME, manifest)
    (out / JOURNAL_NAME).unlink(missing_ok=True)
    ckpt.close()
    return manifest

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

import dataclasses
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
from tuckerize.errors import CalibrationError, OutputConflictError, RankError
from tuckerize.experts import expert_tensor_names, stack_projection
from tuckerize.format import (
    FORMAT_VERSION,
    JOURNAL_NAME,
    MANIFEST_NAME,
    factor_name,
    tucker_config,
    unit_file,
)
from tuckerize.progress import Progress, ensure
from tuckerize.ranks import RankPlan, load_plan, uniform_plan

#: Files of the calibration that an output folder may hold besides the checkpoint;
#: --overwrite keeps them (statistics are reusable across rank choices).
CALIBRATION_FILES = ("calibration_stats.safetensors", "calibration_stats.json")
#: The allocated rank plan, copied into the output folder.
PLAN_NAME = "rank_plan.yaml"

#: HOOI sweeps after ST-HOSVD. Measured (BENCHMARKS.md): on expert tensors a sweep
#: lowers the relative error by well under 1% of itself at about 1.6x the HOSVD cost,
#: so the default is the HOSVD alone; ``--iters`` buys the last bit of error.
DEFAULT_ITERS = 0


def model_stem(model: str) -> str:
    return re.sub(r"[^\w.\-]+", "-", Path(model.rstrip("/")).name if Path(model).exists() else model.replace("/", "--"))


def default_out(model: str, plan: RankPlan | None, tag: str | None = None) -> Path:
    stem = model_stem(model)
    if plan is None:
        return Path(f"{stem}-tucker-{tag}")
    if plan.default is not None and not plan.projections and not plan.layers and not plan.layer_projections:
        tag = "-".join(map(str, plan.default))
    else:
        tag = Path(plan.source).stem if plan.source != "--ranks" else "custom"
    return Path(f"{stem}-tucker-{tag}")


def _config_stem(model: str, path: Path) -> str:
    """Name of an allocated rank plan: ``demo``/``demo-mixtral`` for the embedded demo
    models (whose folders are called model/ and mixtral/), else the model's name."""
    from tuckerize.demo import DEMO_DIR

    p = path.resolve()
    if p == DEMO_DIR.resolve():
        return "demo"
    if p.parent == DEMO_DIR.parent.resolve():
        return f"demo-{p.name}"
    return model_stem(model)


def _device(name: str):
    from tuckerize.devices import resolve_device

    return resolve_device(name)


def _claim_out(out: Path, overwrite: bool) -> None:
    """Check that ``out`` is free or ours; with ``overwrite``, empty it (calibration
    statistics excepted: they do not depend on the ranks)."""
    if out.exists() and not out.is_dir():
        raise OutputConflictError(f"--out {out} is a file; choose a folder path")
    ours = out.is_dir() and any((out / n).is_file() for n in (JOURNAL_NAME, MANIFEST_NAME, PLAN_NAME, *CALIBRATION_FILES))
    if out.is_dir() and any(out.iterdir()) and not ours:
        raise OutputConflictError(
            f"output folder {out} exists and is not a tuckerize checkpoint; choose another --out or remove it"
        )
    if ours and overwrite:
        for child in out.iterdir():
            if child.name in CALIBRATION_FILES:
                continue
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
    out.mkdir(parents=True, exist_ok=True)


def _previous_fingerprint(out: Path) -> dict[str, Any] | None:
    for name in (JOURNAL_NAME, MANIFEST_NAME):
        path = out / name
        if path.is_file():
            return json.loads(path.read_text()).get("fingerprint")
    return None


def _conflict(out: Path) -> OutputConflictError:
    return OutputConflictError(
        f"{out} holds a decomposition with other settings or another source; "
        "pass --overwrite to start over or choose another --out"
    )


def _prepare_out(out: Path, fingerprint: dict[str, Any], overwrite: bool) -> dict[str, Any]:
    """Create or validate the output folder; return the journal of files already done."""
    _claim_out(out, overwrite)
    for name in (JOURNAL_NAME, MANIFEST_NAME):
        path = out / name
        if path.is_file():
            previous = json.loads(path.read_text())
            if previous.get("fingerprint") != fingerprint:
                raise _conflict(out)
            return previous.get("files", {})
    return {}


def _write_plan(plan: RankPlan, path: Path, header: str) -> None:
    import yaml

    from tuckerize.checkpoint import atomic_write

    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(f"# {line}\n" for line in header.splitlines()) + yaml.safe_dump(plan.to_dict(), sort_keys=False, default_flow_style=None)
    with atomic_write(path) as tmp:
        tmp.write_text(text)


def _tucker_experts(spec, src_config: dict[str, Any], plan: RankPlan, layer: int, tensors: dict[str, Any], device=None):
    """The Tucker experts module of ``layer`` from its just-written factors (sequential calibration)."""
    import torch

    from tuckerize.runtime.tucker_experts import TuckerExperts

    E, H, I = spec.shape
    prefix = spec.arch.experts_prefix(layer)
    experts = TuckerExperts(E, H, I, {p: plan.ranks_for(layer, p) for p in PROJECTIONS},
                            act=src_config.get("hidden_act", "silu"), dtype=torch.float32, device=device)
    experts.load_factors({f"{p}.{f}": tensors[factor_name(prefix, p, f)] for p in PROJECTIONS for f in FACTORS})
    return experts


def _decompose_projection(stacked, rank, layer_stats, proj: str, options, down, iters: int, tol: float,
                          keep_weights: dict | None = None):
    """One projection's Tucker factors: plain, pooled-whitened, or per-expert weighted
    (started from the pooled whitening at r_E = E). ``keep_weights``: where to keep the
    per-expert weights ``(A, B)`` for a later ``--refit`` of the layer (they cost a
    [E, H, I] x [E, H, I] product to form)."""
    from tuckerize.calibrate import expert_weights, mode_weights
    from tuckerize.decompose import tucker
    from tuckerize.decompose.expert_weighted import expert_weighted_tucker
    from tuckerize.decompose.whiten import whitened_tucker

    if layer_stats is None:
        return tucker(stacked, rank, n_iter_max=iters, tol=tol)
    pooled = mode_weights(layer_stats, proj, options)
    if options.method == "pooled":
        return whitened_tucker(stacked, rank, pooled, n_iter_max=iters, tol=tol)
    E = stacked.shape[0]
    init = whitened_tucker(stacked, (E, rank[1], rank[2]), [None, *pooled[1:]], n_iter_max=iters, tol=tol)
    A, B = expert_weights(layer_stats, proj, down, options)
    if keep_weights is not None:
        keep_weights[proj] = (A, B)
    return expert_weighted_tucker(stacked, rank, A, B, init=init, iters=options.iters)


def _weighted_error(stacked, factors, core, layer_stats, proj: str, options, expert_AB) -> tuple[float, float | None]:
    """(relative error, relative weighted output error or None) of written factors, under
    the weighting the decomposition used (``expert_AB``: the per-expert weights ``(A, B)``
    of ``--whitening expert``)."""
    from tuckerize.calibrate import mode_weights
    from tuckerize.decompose import TuckerTensor
    from tuckerize.decompose.expert_weighted import weighted_objective
    from tuckerize.decompose.whiten import factor_errors

    if layer_stats is None or options.method == "pooled":
        weights = mode_weights(layer_stats, proj, options) if layer_stats is not None else None
        return factor_errors(stacked, factors, core, weights)
    rel, _ = factor_errors(stacked, factors, core, None)
    A, B = expert_AB
    recon = TuckerTensor(core=core.double(), factors=[f.double() for f in factors]).to_tensor()
    f, f0 = weighted_objective(stacked, A, B, recon), weighted_objective(stacked, A, B)
    return rel, (f / f0) ** 0.5 if f0 > 0 else 0.0


def _refit_layer(runner, spec, src_config, layer, tensors, errors, ckpt, options, layer_stats, dev,
                 refit_damp: float, expert_weights: dict) -> None:
    """Refit each expert's core of ``layer`` to its own routed calibration data
    (:class:`tuckerize.calibrate.RefitCollector`) and recompute the reported errors.
    ``expert_weights``: projection -> (A, B) kept by the ``--whitening expert`` decomposition."""
    from tuckerize.calibrate import RefitCollector

    prefix = spec.arch.experts_prefix(layer)
    factors = {p: {f: tensors[factor_name(prefix, p, f)] for f in FACTORS} for p in PROJECTIONS}
    expert_method = layer_stats is not None and options.method == "expert"
    # --whitening expert already fits down exactly (its per-expert input covariance is the
    # refit's statistic); gate/up gain each expert's own hidden covariance, keeping their
    # per-expert output-side weights
    projections = ("gate", "up") if expert_method else PROJECTIONS
    collector = RefitCollector(runner.stacked_experts(layer), src_config.get("hidden_act", "silu"), factors,
                               projections)
    runner.run(layer, experts=collector, update=False)
    cores = collector.cores(refit_damp, {p: expert_weights[p][1] for p in projections} if expert_method else None)
    for p in projections:
        U_E = factors[p]["U_E"]
        if U_E.shape[0] != U_E.shape[1]:
            errors[p]["refit"] = False  # r_E < E: the per-expert cores are not free
            continue
        tensors[factor_name(prefix, p, "core")] = cores[p].cpu().contiguous()
        stacked = stack_projection(ckpt, spec, layer, p).to(dev)
        f = [factors[p][k].to(dev) for k in ("U_E", "U_H", "U_I")]
        rel, white = _weighted_error(stacked, f, cores[p].to(dev), layer_stats, p, options, expert_weights.get(p))
        errors[p]["relative_error"] = rel
        if white is not None:
            errors[p]["whitened_error"] = white
        errors[p]["refit"] = True
        del stacked
    del collector


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
    ratio: float | None = None,
    params: int | None = None,
    revision: str | None = None,
    iters: int = DEFAULT_ITERS,
    tol: float = 1e-4,
    device: str = "cpu",
    overwrite: bool = False,
    progress: Progress | None = None,
    calibration: str | None = None,
    samples: int = 128,
    seqlen: int = 512,
    stats: str | Path | None = None,
    whiten: bool = True,
    whiten_options: Any = None,
    sequential: bool = False,
    expert_rank: str = "full",
    normalise: str = "relative",
    save_config: str | Path | None = None,
    per_expert_stats: bool = False,
    calibration_batch: int = 8,
    refit: bool = False,
    alloc_damp: float | None = None,
    refit_damp: float = 1e-2,
) -> dict[str, Any]:
    """Decompose every MoE layer of ``model`` and write a self-contained Tucker checkpoint.

    Parameters
    ----------
    model : hub id or local folder of a Hugging Face MoE checkpoint.
    out : output folder (default: ``<model>-tucker-<ranks>`` in the working directory).
    ranks : ``"r_E,r_H,r_I"`` for every layer and projection, or
    config : a YAML rank plan (see :mod:`tuckerize.ranks`), or
    ratio : fraction of the routed experts' parameters to keep, or
    params : number of routed-expert parameters to keep; with ``ratio``/``params`` the
        ranks are allocated per layer and projection (:mod:`tuckerize.allocate`) and the
        plan is written to ``save_config`` (default ``configs/<model>-keep<ratio>.yaml``)
        and to ``out/rank_plan.yaml``; ``alloc_damp`` is the whitening ridge of the spectra
        it compares (default :data:`~tuckerize.decompose.whiten.DEFAULT_ALLOC_DAMP`).
    iters : HOOI sweeps after ST-HOSVD.
    device : ``cpu``, ``cuda`` (or ``cuda:N``) or ``npu``.
    calibration : calibration text (see :func:`tuckerize.calibrate.read_calibration_text`);
        with it, ``samples`` windows of ``seqlen`` tokens are run through the model one
        layer at a time and each projection is decomposed whitened by its input statistics
        (:mod:`tuckerize.decompose.whiten`), unless ``whiten=False``.
    stats : saved statistics (``calibration_stats.safetensors`` or its folder) to use
        instead of collecting them; statistics found in ``out`` with matching settings
        are reused too.
    sequential : feed each layer the hidden states of the already compressed layers.
    whiten_options : :class:`tuckerize.calibrate.WhitenOptions` (method ``expert``, the
        default, or ``pooled``; ridge; ALS sweeps; ``expert_hidden``).
    per_expert_stats : also collect each expert's hidden covariance (``--expert-hidden``).
    refit : after the whitened decomposition of a layer, refit each expert's core to that
        expert's own routed calibration data (needs ``calibration``; one more pass of the
        calibration tokens through each layer; only where r_E = E). With ``method="expert"``
        only gate/up are refitted (down's cores are already fitted to each expert's own
        inputs), keeping their per-expert output-side weights.

    Returns the manifest (also written to ``out/tuckerize_manifest.json``).
    """
    import torch

    from tuckerize.calibrate import WhitenOptions, mode_weights
    from tuckerize.decompose.whiten import DEFAULT_ALLOC_DAMP

    started = time.time()
    progress = ensure(progress)
    if sum(x is not None for x in (ranks, config, ratio, params)) != 1:
        raise RankError("give exactly one of --ranks r_E,r_H,r_I, --config FILE.yaml, --ratio F or --params N")
    plan: RankPlan | None = None
    if ranks is not None:
        plan = uniform_plan(ranks)
    elif config is not None:
        plan = load_plan(config)
    if iters < 0:
        raise RankError(f"--iters {iters} is negative; use 0 (ST-HOSVD only) or a positive number of HOOI sweeps")
    calibrated = calibration is not None or stats is not None
    if sequential and calibration is None:
        raise CalibrationError("--sequential needs --calibration TEXT (it runs calibration tokens through the compressed layers)")
    if refit and calibration is None:
        raise CalibrationError("--refit needs --calibration TEXT (it runs the calibration tokens through each layer)")
    if sequential and not whiten:
        raise CalibrationError("--sequential only changes the whitening statistics; drop --no-whiten or --sequential")
    if calibration is not None and (samples < 1 or seqlen < 2):
        raise CalibrationError(f"--samples {samples} --seqlen {seqlen}: need at least 1 sample of at least 2 tokens")
    if ratio is not None and not (0.0 < ratio <= 1.0):
        raise RankError(f"--ratio {ratio} is outside (0, 1]; it is the fraction of expert parameters kept, e.g. 0.75")
    if params is not None and params < 1:
        raise RankError(f"--params {params} must be a positive number of routed-expert parameters to keep")
    if expert_rank not in ("full", "auto"):
        raise RankError(f"--expert-rank {expert_rank} is not 'full' (r_E = number of experts) or 'auto'")
    options = whiten_options if whiten_options is not None else WhitenOptions()
    cal_text = None
    if calibration is not None:
        from tuckerize.calibrate import read_calibration_text

        cal_text = read_calibration_text(calibration)  # a missing file fails here, before any work
    dev = _device(device)
    # Calibration runs where float64 accumulation is available: CUDA, else the CPU.
    cal_device = dev if getattr(dev, "type", str(dev)) == "cuda" else "cpu"

    source: ModelSource = resolve_model(model, revision)
    src_config = load_config(source.path)
    spec = moe_spec(src_config)
    if plan is not None:
        plan.check(spec.moe_layers, spec.shape)
    ckpt = Checkpoint.open(source.path)
    E, H, I = spec.shape
    n_tensors = len(spec.moe_layers) * len(PROJECTIONS)
    budget = None
    if plan is None:
        from tuckerize.allocate import expert_budget

        budget = expert_budget(spec.shape, n_tensors, ratio=ratio, params=params)

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
    whitening_on = calibrated and whiten
    if whitening_on:
        settings["algorithm"] = "whitened-" + settings["algorithm"] + ("+expert-als" if options.method == "expert" else "")
    if budget is not None:
        tag = f"keep{ratio:g}" if ratio is not None else f"params{params}"
    else:
        tag = None
    out = Path(out) if out is not None else default_out(model, plan, tag)
    _claim_out(out, overwrite)
    previous = None if overwrite else _previous_fingerprint(out)
    if previous is not None and (
        previous.get("source_files") != source_files
        or previous.get("settings") != settings
        or bool(previous.get("calibration")) != calibrated
        or (previous.get("calibration") or {}).get("sequential", False) != sequential
    ):
        raise _conflict(out)  # before spending time on calibration

    # ---- calibration statistics (dense stream), when whitening or allocation needs them
    cal_settings = None
    cal_stats = None
    tokens = None
    cal_info: dict[str, Any] | None = None
    if calibrated:
        from tuckerize.calibrate import (
            STATS_NAME,
            STATS_VERSION,
            CalibrationSettings,
            CalibrationStats,
            calibration_tokens,
            collect_statistics,
            model_fingerprint,
            text_sha256,
        )

        model_sha = model_fingerprint(source_files)
        if calibration is not None:
            assert cal_text is not None
            text, label = cal_text
            cal_text = None
            cal_settings = CalibrationSettings(source=label, samples=samples, seqlen=seqlen,
                                               text_sha256=text_sha256(text), model_sha256=model_sha,
                                               per_expert=per_expert_stats)
            tokens = calibration_tokens(text, source.path, samples, seqlen)
            del text
        need_dense = not sequential or plan is None
        if need_dense:
            candidates = [Path(stats)] if stats is not None else []
            if (out / STATS_NAME).is_file():
                candidates.append(out / STATS_NAME)
            for cand in candidates:
                loaded = CalibrationStats.load(cand)
                if loaded.settings.version != STATS_VERSION:
                    if stats is not None and cand == Path(stats):
                        raise CalibrationError(f"calibration statistics {cand} are format {loaded.settings.version}, "
                                               f"this tuckerize reads format {STATS_VERSION}; drop --stats to recollect")
                    continue
                if loaded.settings.model_sha256 != model_sha:
                    if stats is not None and cand == Path(stats):
                        raise CalibrationError(f"calibration statistics {cand} were collected on another model or "
                                               "checkpoint version; drop --stats or pass this model's")
                    continue
                if cal_settings is not None and loaded.settings.key() != cal_settings.key():
                    if stats is not None and cand == Path(stats):
                        raise CalibrationError(f"calibration statistics {cand} were collected with other settings "
                                               "(text, --samples or --seqlen); drop --stats to recollect")
                    continue
                cal_stats = loaded
                break
            if cal_stats is None:  # streamed to out/ layer by layer
                cal_stats = collect_statistics(source.path, cal_settings, tokens, out=out,
                                               batch_size=calibration_batch, progress=progress, device=cal_device)
            cal_stats.check_model(spec.moe_layers, spec.shape)
            cal_stats.save(out)  # a copy next to the output when they came from elsewhere
            cal_settings = cal_stats.settings
        cal_info = {
            "settings": cal_settings.to_dict() if cal_settings is not None else None,
            "stats_file": STATS_NAME if cal_stats is not None else None,
            "collect_seconds": round(cal_stats.seconds, 3) if cal_stats is not None else None,
            "whitening": options.to_dict() if whitening_on else None,
            "sequential": sequential,
            "refit": refit,
            "refit_damp": refit_damp if refit else None,
        }

    # ---- rank allocation to the budget
    allocation_info = None
    if plan is None:
        from tuckerize.allocate import allocate, plan_from_ranks, plan_params
        from tuckerize.decompose.whiten import mode_spectra

        assert budget is not None
        progress.start("allocate", n_tensors)
        spectra = {}
        alloc_options = dataclasses.replace(options, damp=alloc_damp if alloc_damp is not None else DEFAULT_ALLOC_DAMP)
        for layer in spec.moe_layers:
            layer_stats_alloc = cal_stats.layers[layer] if whitening_on and cal_stats is not None else None
            for proj in PROJECTIONS:
                weights = (mode_weights(layer_stats_alloc, proj, alloc_options)
                           if layer_stats_alloc is not None else None)
                stacked = stack_projection(ckpt, spec, layer, proj).to(dev)
                spectra[(layer, proj)] = [v.cpu() for v in mode_spectra(stacked, weights)]
                del stacked
                progress.advance("allocate", 1, layer=layer, projection=proj)
        progress.finish("allocate")
        chosen = allocate(spectra, spec.shape, budget, expert_rank=expert_rank, normalise=normalise)
        plan = plan_from_ranks(chosen, source="allocated")
        plan.check(spec.moe_layers, spec.shape)
        used = plan_params(plan, spec.moe_layers, spec.shape)
        stem = _config_stem(model, source.path)
        save_path = Path(save_config) if save_config is not None else Path("configs") / f"{stem}-{tag}.yaml"
        what = "whitened" if whitening_on else "plain"
        header = (f"Ranks allocated by tuckerize for {source.label}: {used:,} of {E * H * I * n_tensors:,} routed-expert "
                  f"parameters ({used / (E * H * I * n_tensors):.2%}; budget {budget:,}),\n"
                  f"greedy on {what} mode spectra"
                  + (f" (ridge {alloc_options.damp:g})" if whitening_on else "")
                  + f", expert rank {expert_rank}, {normalise} errors"
                  + (f", calibration {cal_settings.source} ({cal_settings.samples} x {cal_settings.seqlen} tokens)."
                     if cal_settings is not None else "."))
        _write_plan(plan, save_path, header)
        allocation_info = {
            "budget": budget, "ratio": ratio, "params": params, "allocated": used,
            "expert_rank": expert_rank, "normalise": normalise, "spectra": what,
            "damp": alloc_options.damp if whitening_on else None,
            "config": str(save_path),
        }
    assert plan is not None

    layer_ranks = {
        str(layer): {p: list(plan.ranks_for(layer, p)) for p in PROJECTIONS} for layer in spec.moe_layers
    }
    fingerprint = {
        "format_version": FORMAT_VERSION,
        "source_files": source_files,
        "ranks": layer_ranks,
        "settings": settings,
    }
    if cal_info is not None:
        fingerprint["calibration"] = {
            "settings": cal_settings.key() if cal_settings is not None else None,
            "whitening": cal_info["whitening"],
            "sequential": sequential,
        }
        if refit:
            fingerprint["calibration"]["refit"] = refit_damp
    done = _prepare_out(out, fingerprint, overwrite=False)
    if allocation_info is not None:
        _write_plan(plan, out / PLAN_NAME, header)

    runner = None
    if sequential or refit:
        from tuckerize.calibrate import LayerwiseRunner
        from tuckerize.runtime.loader import TensorSource

        runner = LayerwiseRunner(TensorSource.open(source.path), tokens, batch_size=calibration_batch, device=cal_device)

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
            if runner is not None and layer >= 0:  # advance the calibration stream through the finished layer
                experts = None
                if is_moe and sequential:
                    from safetensors.torch import load_file

                    experts = _tucker_experts(spec, src_config, plan, layer, load_file(str(out / filename)),
                                              runner.device)
                runner.run(layer, experts=experts)
            continue
        t0 = time.time()
        tensors = {name: ckpt.get(name) for name in units_of[unit]}
        errors: dict[str, Any] = {}
        if is_moe:
            prefix = spec.arch.experts_prefix(layer)
            layer_stats = None
            if whitening_on:
                if runner is not None:
                    from tuckerize.calibrate import LayerStats

                    collected = LayerStats(E, H, I, per_expert=per_expert_stats, device=runner.device)
                    runner.run(layer, stats=collected, update=False)
                    layer_stats = collected.t
                else:
                    assert cal_stats is not None
                    layer_stats = cal_stats.layers[layer]
            down = (stack_projection(ckpt, spec, layer, "down").to(dev)
                    if layer_stats is not None and options.method == "expert" else None)
            kept_weights: dict = {}
            for proj in PROJECTIONS:
                tp = time.time()
                stacked = down if proj == "down" and down is not None else stack_projection(ckpt, spec, layer, proj).to(dev)
                result = _decompose_projection(stacked, plan.ranks_for(layer, proj), layer_stats, proj, options,
                                               down, iters, tol, kept_weights if refit else None)
                del stacked
                for fname, value in zip(FACTORS, [*result.factors, result.core]):
                    tensors[factor_name(prefix, proj, fname)] = value.to("cpu", torch.float32).contiguous()
                errors[proj] = {
                    "ranks": list(result.rank),
                    "relative_error": result.relative_error,
                    "error_history": result.error_history,
                    "seconds": round(time.time() - tp, 3),
                }
                if layer_stats is not None:
                    # relative error in the whitened space: the relative calibration-set output error
                    errors[proj]["whitened_error"] = result.whitened_error
                progress.advance("decompose", 1, layer=layer, projection=proj, error=result.relative_error)
        if is_moe and refit:
            assert runner is not None
            _refit_layer(runner, spec, src_config, layer, tensors, errors, ckpt, options,
                         layer_stats if whitening_on else None, dev, refit_damp, kept_weights)
        down = kept_weights = None
        if runner is not None and layer >= 0:
            seq_experts = (_tucker_experts(spec, src_config, plan, layer, tensors, runner.device)
                           if (is_moe and sequential) else None)
            runner.run(layer, experts=seq_experts)
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
    out_config = tucker_config(src_config, {
        "format_version": FORMAT_VERSION,
        "architecture": spec.arch.name,
        "axes": "W[e, h, i] = sum core[a, b, c] U_E[e, a] U_H[h, b] U_I[i, c]; gate/up/down share (E, H, I)",
        "factors": list(FACTORS),
        "layers": tucker_layers,
    })
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
    if cal_info is not None:
        manifest["calibration"] = cal_info
    if allocation_info is not None:
        manifest["allocation"] = allocation_info
    write_json(out / MANIFEST_NAME, manifest)
    (out / JOURNAL_NAME).unlink(missing_ok=True)
    ckpt.close()
    return manifest

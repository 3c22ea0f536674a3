""":func:`decompose_checkpoint`: the run, start to end, as a sequence of named steps.

request validated -> source opened and hashed -> output folder claimed (lock, cleanup,
conflicts) -> calibration statistics -> ranks (given, or allocated to the budget) ->
journal started (resume) -> per-layer pipeline (:mod:`tuckerize.compress.stages`) ->
config, index and side files -> manifest (:mod:`tuckerize.compress.manifest`).

Under torchrun (a :class:`~tuckerize.parallel.ParallelContext` of several ranks, passed in
by the CLI, never picked up here): rank 0 hashes the source, holds the output folder's
lock, checks an earlier run, allocates the ranks and starts the journal, and tells every
rank the outcome; calibration windows are divided among the ranks
(:func:`tuckerize.calibration.collect.collect_statistics` with the group); the units are
divided by :func:`tuckerize.compress.distribute.assign_units`, each rank reading only its
units' tensors and recording its files in its own journal; after all ranks finish, rank 0
writes config, index, side files and the manifest. A
:class:`~tuckerize.errors.TuckerizeError` on any rank is raised on every rank
(:func:`tuckerize.parallel.agreed`). ``method.sequential`` and ``method.refit`` (each layer's inputs
come from the layer before) are refused under torchrun.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from pathlib import Path
from typing import Any

from tuckerize.checkpoint import INDEX_NAME, SIDE_FILES, copy_file, sha256_file, write_json
from tuckerize.compress.method import DEFAULT_ITERS, Method
from tuckerize.compress.output import PLAN_NAME, OutputFolder
from tuckerize.compress.request import DecomposeRequest, default_out
from tuckerize.errors import CalibrationError
from tuckerize.format import FORMAT_VERSION
from tuckerize.parallel import ParallelContext, agreed, on_rank0
from tuckerize.progress import Progress, ensure


def decompose_checkpoint(
    model: str,
    out: str | Path | None = None,
    *,
    ranks: str | tuple[int, int, int] | None = None,
    config: str | Path | None = None,
    ratio: float | None = None,
    params: int | None = None,
    bytes_budget: float | None = None,
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
    sequential: bool | None = None,
    expert_rank: str | None = None,
    normalise: str = "relative",
    save_config: str | Path | None = None,
    per_expert_stats: bool = False,
    calibration_batch: int = 8,
    refit: bool | None = None,
    alloc_damp: float | None = None,
    refit_damp: float = 1e-2,
    method: Method | None = None,
    factor_dtype: str | None = None,
    parallel: ParallelContext | None = None,
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
        ranks are allocated per layer and projection (:mod:`tuckerize.allocate`), written
        to ``out/rank_plan.yaml`` and returned in the manifest (``rank_plan``); also
        written to ``save_config`` when given; or
    bytes_budget : ``B`` of ``--bytes B``: the routed experts stored in at most ``B`` times
        the bytes of their bf16 dense weights (every scale, zero and shape counted), the
        stored form of every layer and projection (Tucker factors, a GPTQ-quantised base, or
        both; ranks and storage) chosen together for the budget
        (:mod:`tuckerize.compress.bytes_plan`, settings in ``method.bytes``); needs
        ``calibration``. The manifest's ``bytes`` says how the budget was spent
        (``budget``, ``projections``); ``rank_plan`` holds every projection's choice.
    device : ``cpu``, ``cuda`` (or ``cuda:N``) or ``npu``.
    calibration : calibration text (see :func:`tuckerize.text.read_text`);
        with it, ``samples`` windows of ``seqlen`` tokens are run through the model one
        layer at a time and each projection is decomposed weighted by its statistics. Saved
        statistics (a ``.safetensors`` file, or a folder holding
        ``calibration_stats.safetensors``) are used as ``stats``.
    stats : saved statistics (``calibration_stats.safetensors`` or its folder) to use
        instead of collecting them; statistics found in ``out`` with matching settings
        are reused too.
    method : the research settings (:class:`tuckerize.compress.method.Method`, the
        ``method:`` section of a config YAML). Without it they come from ``whiten``,
        ``whiten_options`` (:class:`tuckerize.calibration.weights.WhitenOptions`), ``iters``/``tol``
        (HOOI sweeps after ST-HOSVD), ``alloc_damp`` and ``refit_damp``;
        ``per_expert_stats`` also collects each expert's hidden covariance.
    sequential, refit, expert_rank : when given, replace ``method``'s: feed each layer
        the hidden states of the already compressed layers; refit each expert's core to its
        own routed calibration data (needs calibration text; only where r_E = E); with a
        budget, ``"full"`` keeps r_E = E, ``"auto"`` allocates it too.
    factor_dtype : storage of factors and cores (:func:`tuckerize.quant.parse_factor_dtype`:
        ``float32``, ``bf16``, ``fp16``, ``fp8``, ``int8``, ``int4`` or per factor, e.g.
        ``"int8,core=int4"``). Default, and for factors it leaves out: the source's dtype
        (:meth:`tuckerize.compress.source.SourceModel.factor_dtype`: bf16 for bf16 and FP8
        releases, float32 for float32 checkpoints). Quantised factors are written group-wise
        with their scales and the core refitted to the quantised orthonormal factors
        (:mod:`tuckerize.quant`).
    parallel : the ranks sharing the run (torchrun; see the module docstring). Every rank
        calls with the same arguments (``device`` its own); all return the manifest.

    Returns the manifest (also written to ``out/tuckerize_manifest.json``). Progress:
    tasks ``hash``, ``calibrate``, ``allocate``, ``decompose`` and, when an earlier run is
    continued, ``resume`` (see :meth:`tuckerize.compress.output.OutputFolder.resume`).
    """
    if method is None:
        method = Method(whiten=whiten, iters=iters, tol=tol, alloc_damp=alloc_damp, refit_damp=refit_damp)
    elif whiten_options is None:
        per_expert_stats = per_expert_stats or method.expert_hidden
    given = {"sequential": sequential, "refit": refit, "expert_rank": expert_rank}
    method = dataclasses.replace(method, **{k: v for k, v in given.items() if v is not None})
    request = DecomposeRequest(
        model=model, out=Path(out) if out is not None else None, ranks=ranks,
        config=Path(config) if config is not None else None, ratio=ratio, params=params,
        bytes_budget=bytes_budget, normalise=normalise, save_config=Path(save_config) if save_config is not None else None,
        calibration=calibration, samples=samples, seqlen=seqlen, stats=Path(stats) if stats is not None else None,
        calibration_batch=calibration_batch, method=method,
        whiten_options=whiten_options, per_expert_stats=per_expert_stats, revision=revision, device=device,
        overwrite=overwrite, factor_dtype=factor_dtype,
    )
    return run(request, progress, parallel)


def run(request: DecomposeRequest, progress: Progress | None = None,
        parallel: ParallelContext | None = None) -> dict[str, Any]:
    """Carry out a :class:`DecomposeRequest` (validated here); ``parallel``: the ranks
    sharing it (None: this process alone)."""
    from tuckerize.compress.source import SourceModel
    from tuckerize.devices import resolve_device

    started = time.time()
    progress = ensure(progress)
    parallel = parallel if parallel is not None else ParallelContext()
    agreed(parallel, request.validate)
    if parallel.world > 1 and (request.sequential or request.refit):
        raise CalibrationError(
            f"method.{'sequential' if request.sequential else 'refit'} feeds each layer the outputs of the layer "
            "before and runs in one process; run it without torchrun (calibration alone is shared across processes)")
    dev = resolve_device(request.device, flag="--device")
    # Calibration runs where float64 accumulation is available: CUDA, else the CPU.
    cal_device = dev if getattr(dev, "type", str(dev)) == "cuda" else "cpu"

    source = agreed(parallel, lambda: SourceModel.open(request.model, request.revision))
    request.choose_storage(source.factor_dtype())
    spec = source.spec
    plan = request.plan
    if plan is not None:
        plan.check(spec.moe_layers, spec.shape)
    budget = None
    if request.bytes_budget is not None:
        from tuckerize.compress.bytes_plan import check_bytes_budget

        check_bytes_budget(spec, request.bytes_budget, request.method.bytes)
    elif plan is None:
        from tuckerize.allocate import expert_budget

        budget = expert_budget(spec.shape, source.n_tensors, ratio=request.ratio, params=request.params,
                               expert_rank=request.expert_rank)
    source_files = _hash_source(source, progress, parallel)
    settings = request.settings()
    out = request.out if request.out is not None else default_out(request.model, plan, request.budget_tag)
    folder = OutputFolder(out, progress)
    try:
        with contextlib.ExitStack() as stack:
            # rank 0 alone claims and locks the folder; the others wait for the outcome
            agreed(parallel, lambda: stack.enter_context(folder.claim(request.overwrite)) if parallel.rank == 0
                   else None)
            return _decompose(request, source, source_files, settings, folder, progress, dev, cal_device,
                              budget, started, parallel)
    finally:
        source.ckpt.close()


def _hash_source(source, progress, parallel: ParallelContext) -> dict[str, str]:
    """sha256 of the source files, the files dealt out among the ranks (largest first, to the
    least loaded rank) and the results shared; in the checkpoint's file order."""
    files = list(source.ckpt.files)
    if parallel.world == 1:
        return source.hash_files(progress)
    import torch.distributed as dist

    from tuckerize.compress.distribute import assign_units

    sizes = {i: (source.source.path / f).stat().st_size for i, f in enumerate(files)}
    owner = assign_units(sizes, parallel.world)
    mine = agreed(parallel, lambda: source.hash_files(progress, [f for i, f in enumerate(files)
                                                                 if owner[i] == parallel.rank]))
    parts: list[Any] = [None] * parallel.world
    dist.all_gather_object(parts, mine, group=parallel.group)
    merged = {f: h for part in parts for f, h in part.items()}
    return {f: merged[f] for f in files}


def _decompose(request, source, source_files, settings, folder: OutputFolder, progress, dev, cal_device,
               budget, started, parallel: ParallelContext) -> dict[str, Any]:
    from tuckerize.compress.distribute import assign_units, unit_work
    from tuckerize.compress.manifest import layer_ranks
    from tuckerize.compress.stages import LayerPipeline, choose_strategy
    from tuckerize.ranks import plan_text, save_plan

    out, spec, plan = folder.path, source.spec, request.plan

    def check_previous() -> None:
        previous = None if request.overwrite else folder.previous()
        if previous is not None:  # before spending time on calibration
            fp = previous.get("fingerprint") or {}
            if (fp.get("source_files") != source_files or fp.get("settings") != settings
                    or bool(fp.get("calibration")) != request.calibrated
                    or (fp.get("calibration") or {}).get("sequential", False) != request.sequential):
                raise folder.conflict()

    on_rank0(parallel, check_previous)

    cal = None
    if request.calibrated:
        from tuckerize.compress.statistics import prepare_statistics

        cal = agreed(parallel, lambda: prepare_statistics(
            request, source, source_files, out, progress, cal_device,
            need_dense=not request.sequential or plan is None, parallel=parallel))

    allocation = bytes_plan = None
    if request.bytes_budget is not None:
        from tuckerize.compress.bytes_plan import allocate_bytes_plan

        # the candidates divided among the ranks; every rank chooses from all of them
        bytes_plan = agreed(parallel, lambda: allocate_bytes_plan(request, source, request.bytes_budget, cal.stats,
                                                                  progress, dev, request.method.bytes, parallel))
        plan = bytes_plan
    elif plan is None:
        from tuckerize.compress.allocation import allocate_plan

        # the spectra divided among the ranks; every rank allocates from all of them
        allocation = agreed(parallel, lambda: allocate_plan(request, source, budget, cal.stats if cal else None,
                                                            cal.settings if cal else None, progress, dev, parallel))
        plan = allocation.plan
        if request.save_config is not None:
            on_rank0(parallel, lambda: save_plan(plan, request.save_config, allocation.header))

    ranks = bytes_plan.layer_ranks() if bytes_plan is not None else layer_ranks(plan, spec)
    fingerprint: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "source_files": source_files,
        "ranks": ranks,
        "settings": settings,
    }
    if bytes_plan is not None:
        fingerprint["forms"] = bytes_plan.forms()
    if cal is not None:
        fingerprint["calibration"] = {
            "settings": cal.settings.key() if cal.settings is not None else None,
            "whitening": cal.info["whitening"],
            "sequential": request.sequential,
        }
        if request.refit:
            fingerprint["calibration"]["refit"] = request.method.refit_damp
    side = [n for n in SIDE_FILES if (source.source.path / n).is_file()]
    written = ["config.json", INDEX_NAME, *side] + ([PLAN_NAME] if allocation is not None else [])

    def start() -> dict[str, Any]:
        done = folder.start(fingerprint, written)
        folder.resume(source.units(), done)
        if allocation is not None:
            from tuckerize.checkpoint import write_text

            write_text(out / PLAN_NAME, plan_text(plan, allocation.header))
        return done

    done = on_rank0(parallel, start)
    owner = assign_units(unit_work(source), parallel.world)
    mine = [u for u in sorted(source.units_of) if owner[u] == parallel.rank]
    if parallel.world > 1:
        files_of = {source.unit_file(u) for u in mine}
        agreed(parallel, lambda: folder.start_rank(parallel.rank, fingerprint,
                                                   {f: e for f, e in done.items() if f in files_of}))

    runner = None
    if request.sequential or request.refit:
        from tuckerize.runtime.layerwise import LayerwiseRunner
        from tuckerize.runtime.loader import TensorSource

        runner = LayerwiseRunner(TensorSource.open(source.source.path), cal.tokens,
                                 batch_size=request.calibration_batch, device=cal_device)
    pipeline = LayerPipeline(
        source=source, plan=plan, folder=folder, progress=progress, device=dev, runner=runner,
        strategy=choose_strategy(request.whitening_on, request.whiten_options, request.method.iters,
                                 request.method.tol),
        cal_stats=cal.stats if cal is not None else None, whitening_on=request.whitening_on,
        sequential=request.sequential, refit=request.refit, refit_damp=request.method.refit_damp,
        per_expert_stats=request.per_expert_stats, factor_storage=request.factor_storage,
        bytes_plan=bytes_plan, bytes_method=request.method.bytes,
    )
    agreed(parallel, lambda: pipeline.run(done, units=mine))
    entries = dict(folder.journal["files"])
    if parallel.world > 1:
        import torch.distributed as dist

        gathered: list[Any] = [None] * parallel.world
        dist.all_gather_object(gathered, entries, group=parallel.group)
        entries = {f: e for part in gathered for f, e in part.items()}
    files = {f: entries[f] for f, _ in source.units()}  # in unit order, however the work was divided

    return on_rank0(parallel, lambda: _finish(request, source, source_files, settings, folder, plan, ranks,
                                              fingerprint, files, side, written, cal, allocation, started,
                                              bytes_plan))


def _finish(request, source, source_files, settings, folder, plan, ranks, fingerprint, files, side, written, cal,
            allocation, started, bytes_plan=None) -> dict[str, Any]:
    """Config, index, side files and the manifest (rank 0, after every unit is written)."""
    from tuckerize.compress.manifest import build_manifest, tucker_config

    out, spec = folder.path, source.spec
    folder.journal["files"] = files
    for name in side:
        copy_file(source.source.path / name, out / name)
    forms = bytes_plan.forms() if bytes_plan is not None else None
    write_json(out / "config.json", tucker_config(source.config, spec, ranks, request.factor_storage,
                                                 source.tucker_fp8(request.factor_dtypes), forms))
    weight_map = {n: f for f, e in files.items() for n in e["tensors"]}
    total_size = sum((out / e["file"]).stat().st_size for e in files.values())
    write_json(out / INDEX_NAME,
               {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))})
    side_files = {n: {"bytes": (out / n).stat().st_size, "sha256": sha256_file(out / n)} for n in written}

    collect = cal.stats.layer_seconds if cal is not None and cal.stats is not None else {}
    # each MoE layer's timing: decomposition ("seconds", reading included) and statistics ("collect_seconds")
    timed = {f: {**e, "collect_seconds": round(collect[e["layer"]], 3)} if e.get("layer") in collect else e
             for f, e in files.items()}
    manifest = build_manifest(
        source=source.source, source_files=source_files, out=str(out.resolve()), spec=spec, plan=plan,
        settings=settings, fingerprint=fingerprint, files=timed, model_params=source.total_params(),
        wall_seconds=round(time.time() - started, 3), side_files=side_files,
        calibration=cal.info if cal is not None else None,
        allocation=allocation.info if allocation is not None else None, factor_storage=request.factor_storage,
        source_info=source.describe(), source_bytes=source.expert_bytes(), source_dtype=request.source_dtype,
        factor_dtype=request.factor_dtype, bytes_plan=bytes_plan,
    )
    folder.finish(manifest)
    return manifest

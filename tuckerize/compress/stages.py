"""One decoder layer through the decomposition: named stages and the strategy of the run.

Per output unit (unit 0: tensors outside decoder layers; unit L+1: decoder layer L),
:class:`LayerPipeline` runs, in order::

    load        the unit's non-expert tensors from the source
    statistics  the layer's calibration statistics (loaded, or collected now by the
                layer-by-layer runner with method.sequential / refit)
    decompose   each projection's stacked experts [E, H, I] -> U_E [E, r_E],
                U_H [H, r_H], U_I [I, r_I], core [r_E, r_H, r_I], by the strategy
                chosen once for the run (:func:`choose_strategy`); with ``--bytes``
                each projection in the form its byte plan chose, encoded
                (:func:`tuckerize.compress.form_stage.decompose_forms`)
    refit       each expert's core refitted to its own routed data (method.refit)
    write       the unit's safetensors file, atomically
    journal     the file's size, sha256, errors and tensors recorded in the journal

A unit already written by an earlier run with the same fingerprint is kept after its
checksum is verified (the layer runner is still advanced through it).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from tuckerize.arch import FACTORS, PROJECTIONS
from tuckerize.checkpoint import save_safetensors, sha256_file
from tuckerize.compress.form_stage import decompose_forms
from tuckerize.experts import stack_projection
from tuckerize.format import factor_name

STAGES = ("load", "statistics", "decompose", "refit", "quantise", "write", "journal")


# ------------------------------------------------------------------ strategies
class PlainStrategy:
    """Plain Tucker (ST-HOSVD, then HOOI sweeps): no statistics."""

    name = "plain"
    needs_down = False

    def __init__(self, options, iters: int, tol: float) -> None:
        self.options, self.iters, self.tol = options, iters, tol

    def decompose(self, stacked, rank, layer_stats, proj: str, down, keep_weights: dict | None):
        from tuckerize.decompose import tucker

        return tucker(stacked, rank, n_iter_max=self.iters, tol=self.tol)

    def errors(self, stacked, factors, core, layer_stats, proj: str, expert_AB) -> tuple[float, float | None]:
        """(relative error, relative weighted output error or None) of factors."""
        from tuckerize.decompose.whiten import factor_errors

        return factor_errors(stacked, factors, core, None)


class PooledStrategy(PlainStrategy):
    """One whitening matrix per mode from the pooled covariances, closed form."""

    name = "pooled"

    def decompose(self, stacked, rank, layer_stats, proj, down, keep_weights):
        from tuckerize.calibration.weights import mode_weights
        from tuckerize.decompose.whiten import whitened_tucker

        return whitened_tucker(stacked, rank, mode_weights(layer_stats, proj, self.options),
                               n_iter_max=self.iters, tol=self.tol)

    def errors(self, stacked, factors, core, layer_stats, proj, expert_AB):
        from tuckerize.calibration.weights import mode_weights
        from tuckerize.decompose.whiten import factor_errors

        return factor_errors(stacked, factors, core, mode_weights(layer_stats, proj, self.options))


class ExpertStrategy(PlainStrategy):
    """Per-expert two-sided weights by alternating least squares, started from the pooled
    whitening at r_E = E; needs the layer's down projection for gate/up."""

    name = "expert"
    needs_down = True

    def decompose(self, stacked, rank, layer_stats, proj, down, keep_weights):
        """``keep_weights``: where to keep the per-expert weights ``(A, B)`` for a later
        refit of the layer (they cost a [E, H, I] x [E, H, I] product to form)."""
        from tuckerize.calibration.weights import expert_weights, mode_weights
        from tuckerize.decompose.expert_weighted import expert_weighted_tucker, solver_dtype
        from tuckerize.decompose.whiten import whitened_tucker

        pooled = mode_weights(layer_stats, proj, self.options)
        E = stacked.shape[0]
        init = whitened_tucker(stacked, (E, rank[1], rank[2]), [None, *pooled[1:]], n_iter_max=self.iters, tol=self.tol)
        A, B = expert_weights(layer_stats, proj, down, self.options)
        if keep_weights is not None:
            keep_weights[proj] = (A, B)
        return expert_weighted_tucker(stacked, rank, A, B, init=init, iters=self.options.iters,
                                      dtype=solver_dtype(stacked.device))  # float32 where there is no float64 (NPU)

    def errors(self, stacked, factors, core, layer_stats, proj, expert_AB):
        from tuckerize.decompose import TuckerTensor
        from tuckerize.decompose.expert_weighted import weighted_objective
        from tuckerize.decompose.whiten import factor_errors

        rel, _ = factor_errors(stacked, factors, core, None)
        A, B = expert_AB
        recon = TuckerTensor(core=core.double(), factors=[f.double() for f in factors]).to_tensor()
        f, f0 = weighted_objective(stacked, A, B, recon), weighted_objective(stacked, A, B)
        return rel, (f / f0) ** 0.5 if f0 > 0 else 0.0


def choose_strategy(whitening_on: bool, options, iters: int, tol: float) -> PlainStrategy:
    """Plain without whitening, else by ``options.method`` (``pooled`` or ``expert``)."""
    if not whitening_on:
        return PlainStrategy(options, iters, tol)
    return (ExpertStrategy if options.method == "expert" else PooledStrategy)(options, iters, tol)


# ------------------------------------------------------------------ the per-layer pipeline
@dataclass
class LayerJob:
    """What the stages of one unit pass on to each other."""

    unit: int
    filename: str
    layer: int  # -1 for unit 0
    is_moe: bool
    tensors: dict[str, Any] = field(default_factory=dict)
    errors: dict[str, Any] = field(default_factory=dict)
    layer_stats: Any = None
    kept_weights: dict = field(default_factory=dict)
    started: float = 0.0


@dataclass
class LayerPipeline:
    """The stages of :data:`STAGES` for every unit of a run.

    ``source``: :class:`tuckerize.compress.source.SourceModel`; ``folder``:
    :class:`tuckerize.compress.output.OutputFolder`; ``runner``: the calibration layer
    runner (None unless method.sequential or method.refit); ``cal_stats``: statistics of every layer
    (None when the runner collects them or without whitening).
    """

    source: Any
    plan: Any
    folder: Any
    strategy: PlainStrategy
    progress: Any
    device: Any
    runner: Any = None
    cal_stats: Any = None
    whitening_on: bool = False
    sequential: bool = False
    refit: bool = False
    refit_damp: float = 1e-2
    per_expert_stats: bool = False
    factor_storage: dict[str, Any] | None = None  # tuckerize.quant.storage; None: float32 factors
    bytes_plan: Any = None  # tuckerize.compress.bytes_plan.BytesPlan: every projection's form (--bytes)
    bytes_method: Any = None  # tuckerize.compress.method.BytesMethod

    def run(self, done: dict[str, Any], units: Any = None) -> None:
        """Every unit in order (``units``: only these, e.g. a rank's share under torchrun);
        ``done``: journal entries of an earlier run to verify and keep."""
        src = self.source
        units = sorted(src.units_of if units is None else units)
        total = sum(len(PROJECTIONS) if (u - 1) in src.spec.moe_layers else 1 for u in units)
        self.progress.start("decompose", total)
        for unit in units:
            layer = unit - 1
            job = LayerJob(unit=unit, filename=src.unit_file(unit), layer=layer, is_moe=layer in src.spec.moe_layers)
            entry = done.get(job.filename)
            if self.folder.verified(entry):
                self.keep(job, entry)
                continue
            job.started = time.time()
            self.load(job)
            if job.is_moe:
                self.statistics(job)
                if self.bytes_plan is not None:
                    decompose_forms(self, job, self.bytes_plan, self.bytes_method)
                else:
                    self.decompose(job)
                if self.refit:
                    self.refit_cores(job)
            self.advance_runner(job)
            if job.is_moe and self.factor_storage is not None:
                self.quantise(job)
            self.write(job)
            self.journal(job)
            if not job.is_moe:
                self.progress.advance("decompose", 1, layer=layer)
        self.progress.finish("decompose")

    # ---- a unit kept from an earlier run
    def keep(self, job: LayerJob, entry: dict[str, Any]) -> None:
        self.folder.record(job.filename, entry, save=False)
        steps = len(PROJECTIONS) if job.is_moe else 1
        self.progress.advance("decompose", steps, layer=job.layer, skipped=True)
        if self.runner is not None and job.layer >= 0:  # advance the calibration stream through the layer
            experts = None
            if job.is_moe and self.sequential:
                from safetensors.torch import load_file

                experts = self._tucker_experts(job.layer, load_file(str(self.folder.path / job.filename)))
            self.runner.run(job.layer, experts=experts)

    # ---- the stages
    def load(self, job: LayerJob) -> None:
        job.tensors = {name: self.source.ckpt.get(name) for name in self.source.units_of[job.unit]}

    def statistics(self, job: LayerJob) -> None:
        if not self.whitening_on and self.bytes_plan is None:  # --bytes weighs every form by them
            return
        if self.runner is not None:
            from tuckerize.calibration.stats import LayerStats

            E, H, I = self.source.spec.shape
            collected = LayerStats(E, H, I, per_expert=self.per_expert_stats, device=self.runner.device)
            self.runner.run(job.layer, stats=collected, update=False)
            job.layer_stats = collected.t
        else:
            job.layer_stats = self.cal_stats.layers[job.layer]

    def _stack(self, layer: int, proj: str):
        return stack_projection(self.source.ckpt, self.source.spec, layer, proj, device=self.device).to(self.device)

    def decompose(self, job: LayerJob) -> None:
        import torch

        layer, strategy = job.layer, self.strategy
        prefix = self.source.spec.arch.experts_prefix(layer)
        down = self._stack(layer, "down") if strategy.needs_down else None
        for proj in PROJECTIONS:
            tp = time.time()
            stacked = down if proj == "down" and down is not None else self._stack(layer, proj)
            result = strategy.decompose(stacked, self.plan.ranks_for(layer, proj), job.layer_stats, proj, down,
                                        job.kept_weights if self.refit else None)
            del stacked
            for fname, value in zip(FACTORS, [*result.factors, result.core]):
                job.tensors[factor_name(prefix, proj, fname)] = value.to("cpu", torch.float32).contiguous()
            job.errors[proj] = {
                "ranks": list(result.rank),
                "relative_error": result.relative_error,
                "error_history": result.error_history,
                "seconds": round(time.time() - tp, 3),
            }
            if job.layer_stats is not None:
                # relative error in the whitened space: the relative calibration-set output error
                job.errors[proj]["whitened_error"] = result.whitened_error
            self.progress.advance("decompose", 1, layer=layer, projection=proj, error=result.relative_error)

    def refit_cores(self, job: LayerJob) -> None:
        """Refit each expert's core of the layer to its own routed calibration data
        (:class:`tuckerize.calibration.collect.RefitCollector`) and recompute the reported errors.
        With the per-expert strategy only gate/up are refitted (down's cores are already
        fitted to each expert's own inputs), keeping their per-expert output-side weights."""
        from tuckerize.calibration.collect import RefitCollector

        layer, tensors, errors = job.layer, job.tensors, job.errors
        spec = self.source.spec
        prefix = spec.arch.experts_prefix(layer)
        factors = {p: {f: tensors[factor_name(prefix, p, f)] for f in FACTORS} for p in PROJECTIONS}
        expert_method = self.strategy.name == "expert"
        projections = ("gate", "up") if expert_method else PROJECTIONS
        collector = RefitCollector(self.runner.stacked_experts(layer), self.source.hidden_act, factors, projections)
        self.runner.run(layer, experts=collector, update=False)
        cores = collector.cores(self.refit_damp,
                                {p: job.kept_weights[p][1] for p in projections} if expert_method else None)
        for p in projections:
            U_E = factors[p]["U_E"]
            if U_E.shape[0] != U_E.shape[1]:
                errors[p]["refit"] = False  # r_E < E: the per-expert cores are not free
                continue
            tensors[factor_name(prefix, p, "core")] = cores[p].cpu().contiguous()
            stacked = self._stack(layer, p)
            f = [factors[p][k].to(self.device) for k in ("U_E", "U_H", "U_I")]
            rel, white = self.strategy.errors(stacked, f, cores[p].to(self.device), job.layer_stats, p,
                                              job.kept_weights.get(p))
            errors[p]["relative_error"] = rel
            if white is not None:
                errors[p]["whitened_error"] = white
            errors[p]["refit"] = True
            del stacked
        del collector

    def advance_runner(self, job: LayerJob) -> None:
        """Move the calibration stream through the layer (through its compressed experts
        with method.sequential)."""
        job.kept_weights = {}
        if self.runner is not None and job.layer >= 0:
            experts = self._tucker_experts(job.layer, job.tensors) if (job.is_moe and self.sequential) else None
            self.runner.run(job.layer, experts=experts)

    def quantise(self, job: LayerJob) -> None:
        """Store the layer's factors as :attr:`factor_storage` says (after the runner has
        used them: sequential calibration continues from the unquantised layer)."""
        from tuckerize.quant import encode_projection

        prefix = self.source.spec.arch.experts_prefix(job.layer)
        for p in PROJECTIONS:
            names = {f: factor_name(prefix, p, f) for f in FACTORS}
            factors = {f: job.tensors.pop(n) for f, n in names.items()}
            job.tensors.update(encode_projection(names, factors, self.factor_storage))

    def write(self, job: LayerJob) -> None:
        save_safetensors(job.tensors, self.folder.path / job.filename, metadata={"format": "pt"})

    def journal(self, job: LayerJob) -> None:
        path = self.folder.path / job.filename
        self.folder.record(job.filename, {
            "file": job.filename,
            "layer": job.layer if job.unit else None,
            "tensors": sorted(job.tensors),
            "bytes": path.stat().st_size,
            "sha256": sha256_file(path),
            "errors": job.errors,
            "seconds": round(time.time() - job.started, 3),
        })
        job.tensors = {}

    def _tucker_experts(self, layer: int, tensors: dict[str, Any]):
        """The Tucker experts module of ``layer`` from its factors (sequential calibration)."""
        import torch

        from tuckerize.runtime.tucker_experts import TuckerExperts

        spec = self.source.spec
        E, H, I = spec.shape
        prefix = spec.arch.experts_prefix(layer)
        experts = TuckerExperts(E, H, I, {p: self.plan.ranks_for(layer, p) for p in PROJECTIONS},
                                act=self.source.hidden_act, dtype=torch.float32, device=self.runner.device)
        from tuckerize.quant import decode  # factors as written: plain, or quantised on a resumed run

        experts.load_factors({f"{p}.{f}": decode(tensors, factor_name(prefix, p, f)) for p in PROJECTIONS for f in FACTORS})
        return experts

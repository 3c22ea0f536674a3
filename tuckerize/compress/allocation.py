"""Ranks for a parameter budget (--ratio / --params): the mode spectra of every expert
tensor, then :func:`tuckerize.allocate.allocate`.

:func:`allocate_plan` returns the plan, the YAML header describing how it was made and the
manifest's ``allocation`` record; writing the plan anywhere but the output folder is the
caller's choice (``save_config``, the CLI's ``--save-config``).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuckerize.experts import stack_projection
from tuckerize.ranks import RankPlan


@dataclass
class Allocation:
    plan: RankPlan
    header: str  # comment lines above the plan's YAML
    info: dict[str, Any]  # the manifest's "allocation"


def allocate_plan(request, source, budget: int, cal_stats, cal_settings, progress, device,
                  parallel=None) -> Allocation:
    """Ranks for ``budget`` from every MoE tensor's (whitened) mode spectra. ``parallel``
    (:class:`tuckerize.parallel.ParallelContext`, torchrun): each rank computes the spectra
    of the layers it decomposes (:func:`tuckerize.compress.distribute.assign_units`), they
    are gathered, and every rank runs the same greedy allocation on them."""
    from tuckerize.allocate import allocate, dense_params, plan_from_ranks, plan_params
    from tuckerize.calibration.weights import mode_weights
    from tuckerize.decompose.whiten import DEFAULT_ALLOC_DAMP, mode_spectra

    spec = source.spec
    whitening_on = request.whitening_on
    n_tensors = source.n_tensors
    alloc_damp = request.method.alloc_damp
    alloc_options = dataclasses.replace(request.whiten_options,
                                        damp=alloc_damp if alloc_damp is not None else DEFAULT_ALLOC_DAMP)
    from tuckerize.compress.distribute import per_projection

    stats_of = functools.lru_cache(maxsize=1)(lambda layer: cal_stats.layers[layer])  # read once per layer

    def spectrum(layer: int, proj: str):
        layer_stats = stats_of(layer) if whitening_on and cal_stats is not None else None
        weights = mode_weights(layer_stats, proj, alloc_options) if layer_stats is not None else None
        stacked = stack_projection(source.ckpt, spec, layer, proj).to(device)
        return [v.cpu() for v in mode_spectra(stacked, weights)]

    spectra = per_projection(source, spectrum, progress, parallel)
    chosen = allocate(spectra, spec.shape, budget, expert_rank=request.expert_rank, normalise=request.normalise)
    plan = plan_from_ranks(chosen, source="allocated")
    plan.check(spec.moe_layers, spec.shape)
    used = plan_params(plan, spec.moe_layers, spec.shape)
    total = dense_params(spec.shape) * n_tensors
    what = "whitened" if whitening_on else "plain"
    header = (f"Ranks allocated by tuckerize for {source.source.label}: {used:,} of {total:,} routed-expert "
              f"parameters ({used / total:.2%}; budget {budget:,}),\n"
              f"greedy on {what} mode spectra"
              + (f" (ridge {alloc_options.damp:g})" if whitening_on else "")
              + f", expert rank {request.expert_rank}, {request.normalise} errors"
              + (f", calibration {cal_settings.source} ({cal_settings.samples} x {cal_settings.seqlen} tokens)."
                 if cal_settings is not None else "."))
    info = {
        "budget": budget, "ratio": request.ratio, "params": request.params, "allocated": used,
        "expert_rank": request.expert_rank, "normalise": request.normalise, "spectra": what,
        "damp": alloc_options.damp if whitening_on else None,
        "config": str(Path(request.save_config)) if request.save_config is not None else None,
    }
    return Allocation(plan=plan, header=header, info=info)

"""Collecting calibration statistics: the model run layer by layer, statistics filled.

:func:`collect_statistics`: every MoE layer's :class:`~tuckerize.calibration.stats.LayerStats`
from the original model's hidden states (the dense stream), streamed to the statistics
file one layer at a time (:mod:`tuckerize.calibration.store`).
:class:`RefitCollector`: the per-expert sums that ``method.refit`` solves
(:func:`tuckerize.decompose.refit.refit_cores`), given a layer's shared factors.
Both run the layers through :class:`tuckerize.runtime.layerwise.LayerwiseRunner`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Mapping

import torch
import torch.nn as nn

from tuckerize.arch import PROJECTIONS
from tuckerize.calibration.stats import LayerStats, stats_layout
from tuckerize.calibration.store import STATS_NAME, CalibrationSettings, CalibrationStats, LazyLayers, StreamingSafetensors
from tuckerize.errors import CalibrationError
from tuckerize.parallel import activation
from tuckerize.runtime.layerwise import CollectingExperts, LayerwiseRunner
from tuckerize.runtime.routing import expert_groups, sorted_pairs


class RefitCollector(nn.Module):
    """Dense routed experts that accumulate, per expert, what refitting its Tucker core to
    its own routed calibration data needs, given the shared factors U_H, U_I of each
    projection (each expert's exact hidden covariance, projected on U_H: no E x H x H
    covariances):

    gate/up: ``Z = X_e U_H`` gives ``A_e = Z^T D Z`` (r_H x r_H) and ``C_e = Z^T D X_e W_e``
    (r_H x I), ``D = diag(w^2)``; the core minimising
    ``tr(dW_e^T C_xe dW_e B_e)`` (``B_e``: the output-side weight of
    ``--whitening expert``, identity for ``pooled``) solves the Sylvester equation
    ``A_e G Q_e = C_e B_e U_I`` with ``Q_e = U_I^T B_e U_I``.
    down: ``z = U_I^T a_e``, ``y = U_H^T W_e a_e`` give ``A_e = sum w^2 z z^T`` (r_I x r_I),
    ``B_e = sum w^2 y z^T`` (r_H x r_I) and ``G A_e = B_e``.
    """

    def __init__(self, stacked: Mapping[str, torch.Tensor], act: str, factors: Mapping[str, Mapping[str, torch.Tensor]],
                 projections: tuple[str, ...] = PROJECTIONS):
        super().__init__()
        self.w = dict(stacked)
        self.num_experts = self.w["gate"].shape[0]
        self.act_fn = activation(act)
        self.projections = tuple(projections)
        device = self.w["gate"].device
        self.f = {p: {k: v.to(device, torch.float32) for k, v in factors[p].items()} for p in PROJECTIONS}
        E = self.num_experts
        I = self.w["gate"].shape[2]
        self.A: dict[str, torch.Tensor] = {}
        self.B: dict[str, torch.Tensor] = {}
        for p in self.projections:
            rH, rI = self.f[p]["U_H"].shape[1], self.f[p]["U_I"].shape[1]
            ra = rI if p == "down" else rH
            self.A[p] = torch.zeros(E, ra, ra, dtype=torch.float64, device=device)
            self.B[p] = torch.zeros(E, rH, rI if p == "down" else I, dtype=torch.float64, device=device)

    def partial(self, x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        x = x.float()
        pair_e, pair_t, pair_w = sorted_pairs(top_k_index, top_k_weights.float())
        for e, a0, a1 in expert_groups(pair_e, self.num_experts):
            t = pair_t[a0:a1]
            w2 = pair_w[a0:a1].double().pow(2)[:, None]
            h = x[t]
            outs = {}
            for p in ("gate", "up"):
                outs[p] = h @ self.w[p][e].float()
                if p in self.projections:
                    z = (h @ self.f[p]["U_H"]).double()
                    self.A[p][e] += (z * w2).T @ z
                    self.B[p][e] += (z * w2).T @ outs[p].double()
            if "down" in self.projections:
                a = self.act_fn(outs["gate"]) * outs["up"]
                Wd = self.w["down"][e].float()  # [H, I]: out = a @ Wd^T
                z = (a @ self.f["down"]["U_I"]).double()
                y = ((a @ Wd.T) @ self.f["down"]["U_H"]).double()
                self.A["down"][e] += (z * w2).T @ z
                self.B["down"][e] += (y * w2).T @ z
        return torch.zeros_like(x)

    def finish(self, s: torch.Tensor) -> torch.Tensor:
        return s

    def cores(self, damp: float, output_weights: Mapping[str, torch.Tensor | None] | None = None) -> dict[str, torch.Tensor]:
        """Refitted cores per projection (:func:`tuckerize.decompose.refit.refit_cores`:
        each expert's problem shrunk towards its current core by ``damp``).
        ``output_weights[p]``: gate/up's per-expert output-side weights [E, I, I] (None:
        identity). Needs r_E = E (U_E square)."""
        from tuckerize.decompose.refit import refit_cores

        return {p: refit_cores(self.A[p], self.B[p], self.f[p], damp, (output_weights or {}).get(p), down=p == "down")
                for p in self.projections}


def collect_statistics(
    model_folder: str | Path,
    settings: CalibrationSettings,
    tokens: torch.Tensor,
    *,
    out: str | Path | None = None,
    batch_size: int = 8,
    progress=None,
    on_block_input: Callable[[int, torch.Tensor], None] | None = None,
    device=None,
    group=None,
) -> CalibrationStats:
    """Statistics of every MoE layer from the original model's hidden states (dense stream).

    ``tokens`` [N, L]. With ``out``, each layer's statistics are written to
    ``out/calibration_stats.safetensors`` as soon as the layer is done (then
    ``calibration_stats.json``), and the returned statistics read from that file: memory
    holds one layer's statistics at most. ``device``: where layers run and statistics
    accumulate (float64; CPU or CUDA).

    ``group``: a ``torch.distributed`` process group to share the work (e.g. every rank of a
    ``torchrun``; None: this process alone; never picked up implicitly). The windows are
    divided among its ranks in whole micro-batches of ``batch_size`` (each rank runs exactly
    the micro-batches one process would, so the activations are identical), every rank runs
    the layers one at a time over its windows, and each layer's float64 statistics are
    summed with ``all_reduce``: the result equals one process's up to summation order.
    ``layer_seconds`` of the result: each MoE layer's wall time on this rank (its forward
    passes, the all-reduce and the write), ``seconds`` the whole collection's.
    Every rank must call with the same arguments; only rank 0 writes ``out`` (a folder all
    ranks see), the others wait for it and read from it.
    """
    from tuckerize.progress import ensure
    from tuckerize.runtime.loader import TensorSource
    from tuckerize.parallel import ParallelContext, split_range

    t0 = time.time()
    progress = ensure(progress)
    rank, world = 0, 1
    if group is not None:
        import torch.distributed as dist

        rank, world = dist.get_rank(group), dist.get_world_size(group)
    source = TensorSource.open(model_folder, parallel=ParallelContext())  # whole tensors on every rank
    spec = source.spec
    bs = max(1, int(batch_size))
    b0, b1 = split_range(-(-tokens.shape[0] // bs), world, rank)
    mine = tokens[b0 * bs : b1 * bs]
    # a rank left without windows (fewer micro-batches than ranks) adds zeros to the sums
    runner = LayerwiseRunner(source, mine, batch_size=bs, device=device) if mine.shape[0] else None
    stats_device = runner.device if runner is not None else torch.device(device if device is not None else "cpu")
    stats = CalibrationStats(settings=settings)
    writer = None
    if out is not None:
        out = Path(out)
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            writer = StreamingSafetensors(out / STATS_NAME,
                                          stats_layout(spec.moe_layers, spec.shape, settings.per_expert),
                                          {"format": "pt", "tuckerize": "calibration statistics"})
    try:
        progress.start("calibrate", spec.num_layers)
        for layer in range(spec.num_layers):
            tl = time.time()
            st = (LayerStats(*spec.shape, per_expert=settings.per_expert, device=stats_device)
                  if layer in spec.moe_layers else None)
            if runner is not None:
                runner.run(layer, stats=st, on_block_input=on_block_input)
            if st is not None:
                if group is not None:
                    st.all_reduce(group)
                if not all(bool(torch.isfinite(v).all()) for v in st.t.values()):
                    raise CalibrationError(f"calibration produced NaN or Inf activations in layer {layer}; "
                                           "the checkpoint or the text is unusable")
                if writer is not None:
                    for k, v in st.t.items():
                        writer.write(f"layers.{layer}.{k}", v)
                elif out is None:
                    stats.layers[layer] = {k: v.cpu() for k, v in st.t.items()}  # type: ignore[index]
                stats.layer_seconds[layer] = time.time() - tl
            progress.advance("calibrate", 1, layer=layer)
        progress.finish("calibrate")
        stats.seconds = time.time() - t0
        if writer is not None:
            writer.commit()
            writer = None
            stats.layers = LazyLayers(out / STATS_NAME)  # the metadata lists the layers written
            stats._write_meta(out, out / STATS_NAME)
        if out is not None:
            if group is not None:
                import torch.distributed as dist

                dist.barrier(group)  # rank 0's file is complete
            stats.layers = LazyLayers(out / STATS_NAME)
            stats.path = out / STATS_NAME
    finally:
        if writer is not None:
            writer.abort()
    return stats

__all__ = ["CollectingExperts", "RefitCollector", "collect_statistics"]

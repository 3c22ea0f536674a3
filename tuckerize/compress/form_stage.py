"""The decompose stage of a ``--bytes`` run: each projection of a layer in its chosen form.

:func:`decompose_forms` replaces the Tucker-only ``decompose`` stage of
:class:`tuckerize.compress.stages.LayerPipeline` when the run has a
:class:`~tuckerize.compress.bytes_plan.BytesPlan`: for each projection it computes and encodes
the option the plan chose (:func:`tuckerize.compress.forms.realise`: a GPTQ base, calibrated
Tucker factors and cores, or both), writes the tensors into the layer's job and records the
form, ranks, storage, bytes and errors (the manifest's ``tensors`` and ``bytes``).
"""

from __future__ import annotations

import time

from tuckerize.arch import FACTORS, PROJECTIONS
from tuckerize.format import base_name, factor_name


def decompose_forms(pipeline, job, plan, method) -> None:
    """Every projection of ``job``'s layer as ``plan`` says (``method``:
    :class:`tuckerize.compress.forms.BytesMethod`); ``pipeline``: the
    :class:`~tuckerize.compress.stages.LayerPipeline` (source, strategy, device, progress)."""
    from tuckerize.calibration.weights import expert_weights
    from tuckerize.compress.forms import realise

    layer, strategy = job.layer, pipeline.strategy
    prefix = pipeline.source.spec.arch.experts_prefix(layer)
    down = pipeline._stack(layer, "down")
    stats = job.layer_stats
    for proj in PROJECTIONS:
        tp = time.time()
        stacked = down if proj == "down" else pipeline._stack(layer, proj)
        A, B = expert_weights(stats, proj, down, strategy.options)

        def decompose_tucker(T, ranks, proj=proj):
            return strategy.decompose(T, ranks, stats, proj, down, None)

        names = {f: factor_name(prefix, proj, f) for f in FACTORS}
        tensors, record = realise(stacked, plan.option(layer, proj), proj=proj, layer_stats=stats, A=A, B=B,
                                  decompose_tucker=decompose_tucker, names=names, base_name=base_name(prefix, proj),
                                  method=method)
        job.tensors.update({k: v.cpu().contiguous() for k, v in tensors.items()})
        record["seconds"] = round(time.time() - tp, 3)
        record["error_history"] = None
        job.errors[proj] = record
        del stacked
        pipeline.progress.advance("decompose", 1, layer=layer, projection=proj, error=record["relative_error"])


__all__ = ["decompose_forms"]

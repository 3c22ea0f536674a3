"""Calibration statistics for a decomposition: reuse saved ones when they match, else collect.

:func:`prepare_statistics` tokenises the calibration text, looks for statistics with the
same model and settings (``--calibration STATS``, then the output folder) and otherwise streams new
ones into the output folder layer by layer (:func:`tuckerize.calibration.collect.collect_statistics`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuckerize.checkpoint import output_errors
from tuckerize.errors import CalibrationError


@dataclass
class Statistics:
    """What the calibration stage hands on: settings, the dense statistics (None with
    method.sequential and a given plan), the token windows, and the manifest's record."""

    settings: Any = None  # tuckerize.calibration.store.CalibrationSettings
    stats: Any = None  # tuckerize.calibration.store.CalibrationStats
    tokens: Any = None  # [samples, seqlen] int64
    info: dict[str, Any] | None = None


def prepare_statistics(request, source, source_files: dict[str, str], out: Path, progress, cal_device,
                       need_dense: bool, parallel=None) -> Statistics:
    """The statistics of a calibrated ``request`` (:class:`~tuckerize.compress.request.DecomposeRequest`).

    ``parallel``: the ranks of a torchrun (:class:`tuckerize.parallel.ParallelContext`; every
    rank calls): new statistics are collected with the windows divided among them and
    summed (rank 0 writes them into ``out``)."""
    from tuckerize.calibration.collect import collect_statistics
    from tuckerize.calibration.store import STATS_NAME, STATS_VERSION, CalibrationSettings, CalibrationStats, model_fingerprint
    from tuckerize.calibration.tokens import calibration_tokens, text_sha256

    result = Statistics()
    model_sha = model_fingerprint(source_files)
    if request.calibration is not None:
        assert request.calibration_text is not None
        text, label = request.calibration_text
        request.calibration_text = None
        result.settings = CalibrationSettings(source=label, samples=request.samples, seqlen=request.seqlen,
                                              text_sha256=text_sha256(text), model_sha256=model_sha,
                                              per_expert=request.per_expert_stats)
        result.tokens = calibration_tokens(text, source.source.path, request.samples, request.seqlen)
        del text
    if need_dense:
        stats = Path(request.stats) if request.stats is not None else None
        candidates = [stats] if stats is not None else []
        if (out / STATS_NAME).is_file():
            candidates.append(out / STATS_NAME)
        for cand in candidates:
            given = stats is not None and cand == stats
            loaded = CalibrationStats.load(cand)
            if loaded.settings.version != STATS_VERSION:
                if given:
                    raise CalibrationError(f"calibration statistics {cand} are format {loaded.settings.version}, "
                                           f"this tuckerize reads format {STATS_VERSION}; pass --calibration TEXT "
                                           "to recollect")
                continue
            if loaded.settings.model_sha256 != model_sha:
                if given:
                    raise CalibrationError(f"calibration statistics {cand} were collected on another model or "
                                           "checkpoint version; pass this model's, or --calibration TEXT to recollect")
                continue
            if result.settings is not None and loaded.settings.key() != result.settings.key():
                if given:
                    raise CalibrationError(f"calibration statistics {cand} were collected with other settings "
                                           "(text, --samples or --seqlen); pass the text alone to recollect")
                continue
            result.stats = loaded
            break
        group, rank = None, 0
        if parallel is not None and parallel.world > 1:
            import torch.distributed as dist

            group, rank = parallel.group if parallel.group is not None else dist.group.WORLD, parallel.rank
        with output_errors(out):
            if result.stats is None:  # streamed to out/ layer by layer
                result.stats = collect_statistics(source.source.path, result.settings, result.tokens, out=out,
                                                  batch_size=request.calibration_batch, progress=progress,
                                                  device=cal_device, group=group)
            result.stats.check_model(source.spec.moe_layers, source.spec.shape)
            if rank == 0:
                result.stats.save(out)  # a copy next to the output when they came from elsewhere
            if group is not None:
                import torch.distributed as dist

                dist.barrier(group)  # the copy is complete before any rank reads it
        result.settings = result.stats.settings
    result.info = {
        "settings": result.settings.to_dict() if result.settings is not None else None,
        "stats_file": STATS_NAME if result.stats is not None else None,
        "collect_seconds": round(result.stats.seconds, 3) if result.stats is not None else None,
        "whitening": request.whiten_options.to_dict() if request.whitening_on else None,
        "sequential": request.sequential,
        "refit": request.refit,
        "refit_damp": request.method.refit_damp if request.refit else None,
    }
    return result

"""Calibration under torch.distributed (issue 12): windows divided among real gloo ranks,
float64 statistics summed with all_reduce, equal to one process up to summation order;
only rank 0 writes the statistics file; ``group=None`` never picks up the global group."""

from __future__ import annotations

import json

import dist_helpers
import numpy as np
import pytest
from calibration_common import DEMO
from calibration_dist import calibration_worker

from tuckerize.calibration.collect import collect_statistics
from tuckerize.calibration.store import STATS_META, STATS_NAME, CalibrationSettings
from tuckerize.calibration.tokens import calibration_tokens
from tuckerize.text import read_text


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    den = np.linalg.norm(b)
    return float(np.linalg.norm(a - b) / den) if den > 0 else float(np.linalg.norm(a))


# 3 micro-batches of 2 windows over 2 ranks (2 + 1); 1 micro-batch over 2 ranks (rank 1 idle)
@pytest.mark.parametrize("samples, batch_size", [(6, 2), pytest.param(2, 4, marks=pytest.mark.slow)])
def test_statistics_over_two_gloo_ranks_equal_one_process(tmp_path, samples, batch_size):
    seqlen = 32
    text, label = read_text("demo")
    tokens = calibration_tokens(text, DEMO, samples, seqlen)
    settings = CalibrationSettings(source=label, samples=samples, seqlen=seqlen, text_sha256="t")
    ref = collect_statistics(DEMO, settings, tokens, batch_size=batch_size)
    dist_helpers.run_workers(calibration_worker, 2, args=(str(tmp_path), samples, seqlen, batch_size), timeout=300)
    checked = 0
    for layer, fields in ref.layers.items():
        for k, v in fields.items():
            want = v.numpy()
            assert want.dtype == np.float64
            for rank in (0, 1):
                got = np.load(tmp_path / f"memory-r{rank}-L{layer}-{k}.npy")
                assert got.dtype == np.float64 and _rel(got, want) < 1e-10, (layer, k, rank, _rel(got, want))
                alone = np.load(tmp_path / f"alone-r{rank}-L{layer}-{k}.npy")  # group=None: all windows alone
                assert _rel(alone, want) < 1e-10, (layer, k, rank)
                checked += 1
    assert checked == 2 * len(ref.layers) * len(next(iter(ref.layers.values()))) > 0
    assert float(ref.layers[0]["tokens"]) == samples * seqlen
    # the shared file: written once (rank 0), read by both ranks; it holds the summed statistics
    reports = [json.loads((tmp_path / f"file-r{r}.json").read_text()) for r in (0, 1)]
    assert reports[0]["path"] == reports[1]["path"] == str(tmp_path / "shared" / STATS_NAME)
    assert reports[0]["listing"] == reports[1]["listing"] == sorted([STATS_NAME, STATS_META])
    assert reports[0]["tokens"] == reports[1]["tokens"] == samples * seqlen
    from tuckerize.calibration.store import CalibrationStats

    on_disk = CalibrationStats.load(tmp_path / "shared")
    for layer in ref.layers:
        got = on_disk.layers[layer]
        for k, v in ref.layers[layer].items():
            tol = 1e-3 if k.endswith("_expert") else 1e-10  # per-expert fields are stored in float16 (scaled)
            assert _rel(got[k].double().numpy(), v.numpy()) < tol, (layer, k)

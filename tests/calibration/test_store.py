"""tuckerize.calibration.store: the streamed statistics file, reuse and its checks, resume and the
manifest's calibration record."""

from __future__ import annotations

import json

import pytest
import torch
from calibration_common import DEMO, SAMPLES, SEQLEN, UNIFORM

from tuckerize.calibration.collect import collect_statistics
from tuckerize.calibration.store import (
    STATS_VERSION,
    CalibrationSettings,
    CalibrationStats,
    dequantize_expert,
    quantize_expert,
)
from tuckerize.calibration.weights import WhitenOptions
from tuckerize.compress import decompose_checkpoint
from tuckerize.decompose.whiten import whitening
from tuckerize.errors import CalibrationError, OutputConflictError
from tuckerize.text import read_text


def test_streamed_statistics_file_equals_in_memory(tiny_factory, tmp_path):
    folder = tiny_factory("qwen3_moe")
    tokens = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(2))
    settings = CalibrationSettings("t", 2, 12, "-")
    mem = collect_statistics(folder, settings, tokens)
    disk = collect_statistics(folder, settings, tokens, out=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calibration_stats.json", "calibration_stats.safetensors"]
    again = CalibrationStats.load(tmp_path)
    assert again.settings == settings and sorted(again.layers) == sorted(mem.layers) == [0, 1]
    # each MoE layer's collection time, kept with the file (to the millisecond)
    assert sorted(disk.layer_seconds) == sorted(again.layer_seconds) == [0, 1]
    assert all(abs(again.layer_seconds[L] - disk.layer_seconds[L]) <= 5e-4 for L in (0, 1))
    assert json.loads((tmp_path / "calibration_stats.json").read_text())["layers"] == [0, 1]
    assert 0 < sum(disk.layer_seconds.values()) <= disk.seconds
    for L in mem.layers:
        for k, v in mem.layers[L].items():
            # per-expert fields are stored in float16 scaled per expert (E times larger than the rest), the rest
            # in float64
            want = dequantize_expert(*quantize_expert(v)) if k.endswith("_expert") else v
            assert torch.equal(disk.layers[L][k], want) and torch.equal(again.layers[L][k], want), (L, k)
            if k.endswith("_expert"):
                assert want.dtype == torch.float32 and float((want.double() - v).norm() / v.norm()) < 1e-3, (L, k)
    mem.save(tmp_path / "copy")
    assert torch.equal(CalibrationStats.load(tmp_path / "copy").layers[1]["inter_routed"], mem.layers[1]["inter_routed"])


def test_statistics_are_reused_and_checked(demo_runs, tmp_path, monkeypatch):
    import tuckerize.calibration.collect as cal

    def boom(*a, **k):
        raise AssertionError("statistics recollected")

    monkeypatch.setattr(cal, "collect_statistics", boom)
    # same settings, explicit --stats: no collection
    m = decompose_checkpoint(str(DEMO), tmp_path / "a", ranks=(16, 32, 16), calibration="demo", samples=SAMPLES,
                             seqlen=SEQLEN, stats=demo_runs["white"])
    assert m["calibration"]["settings"]["samples"] == SAMPLES
    # reused statistics: each layer's collection time is the one recorded when they were collected
    collected = {e["layer"]: e["collect_seconds"] for e in demo_runs["m_white"]["files"].values() if e["errors"]}
    assert {e["layer"]: e["collect_seconds"] for e in m["files"].values() if e["errors"]} == collected
    # statistics found in the output folder are reused too (another rank choice, --overwrite keeps them)
    decompose_checkpoint(str(DEMO), tmp_path / "a", ranks=(16, 40, 20), calibration="demo", samples=SAMPLES,
                         seqlen=SEQLEN, overwrite=True)
    with pytest.raises(CalibrationError, match="other settings"):
        decompose_checkpoint(str(DEMO), tmp_path / "b", ranks=(16, 32, 16), calibration="demo", samples=SAMPLES + 1,
                             seqlen=SEQLEN, stats=demo_runs["white"])
    with pytest.raises(CalibrationError, match="do not exist"):
        decompose_checkpoint(str(DEMO), tmp_path / "c", ranks=(16, 32, 16), stats=tmp_path / "nowhere")
    # statistics of an older format (no per-expert fields) are refused when passed, skipped when found
    old = tmp_path / "old"
    old.mkdir()
    for name in ("calibration_stats.safetensors", "calibration_stats.json"):
        (old / name).write_bytes((demo_runs["white"] / name).read_bytes())
    meta = json.loads((old / "calibration_stats.json").read_text())
    meta["settings"]["version"] = 1
    (old / "calibration_stats.json").write_text(json.dumps(meta))
    with pytest.raises(CalibrationError, match=f"format 1, this tuckerize reads format {STATS_VERSION}"):
        decompose_checkpoint(str(DEMO), tmp_path / "d", ranks=(16, 32, 16), stats=old)
    # per-expert hidden covariances are not in statistics collected without them
    with pytest.raises(CalibrationError, match="hidden_expert"):
        decompose_checkpoint(str(DEMO), tmp_path / "e", ranks=(16, 32, 16), stats=demo_runs["white"],
                             whiten_options=WhitenOptions(expert_hidden=True))


def test_resume_refuses_other_calibration_settings(demo_runs, tmp_path):
    out = tmp_path / "o"
    decompose_checkpoint(str(DEMO), out, ranks=UNIFORM, stats=demo_runs["white"])
    with pytest.raises(OutputConflictError, match="other settings"):
        decompose_checkpoint(str(DEMO), out, ranks=UNIFORM)  # plain Tucker into a whitened folder
    with pytest.raises(OutputConflictError, match="other settings"):
        decompose_checkpoint(str(DEMO), out, ranks=UNIFORM, stats=demo_runs["white"],
                             whiten_options=WhitenOptions(damp=0.5))


def test_manifest_records_calibration(demo_runs):
    m = demo_runs["m_white"]
    cal = m["calibration"]
    assert cal["settings"]["samples"] == SAMPLES and cal["settings"]["seqlen"] == SEQLEN
    assert cal["settings"]["source"] == "demo-calibration" and len(cal["settings"]["text_sha256"]) == 64
    assert cal["whitening"] == WhitenOptions().to_dict() and cal["sequential"] is False
    assert m["settings"]["algorithm"].startswith("whitened-")
    assert m["fingerprint"]["calibration"]["settings"]["samples"] == SAMPLES
    assert (demo_runs["white"] / "calibration_stats.safetensors").is_file()
    assert "calibration" not in demo_runs["m_plain"] and "calibration" not in demo_runs["m_plain"]["fingerprint"]
    # per MoE layer: decomposition time and statistics time; they add up to no more than the whole
    layers = {e["layer"]: e for e in m["files"].values() if e["errors"]}
    assert sorted(layers) == list(m["moe"]["layers"])
    assert all(e["seconds"] > 0 and e["collect_seconds"] > 0 for e in layers.values())
    assert sum(e["collect_seconds"] for e in layers.values()) <= cal["collect_seconds"] + 1e-3 * len(layers)
    meta = json.loads((demo_runs["white"] / "calibration_stats.json").read_text())
    assert meta["collect_seconds"] == {str(L): e["collect_seconds"] for L, e in layers.items()}
    assert all("collect_seconds" not in e for e in demo_runs["m_plain"]["files"].values())


def test_per_expert_quantization_keeps_every_expert():
    """float16 scaled per expert: experts of very different magnitudes (and an all-zero one)
    each keep ~3 significant digits; sums far beyond float16's range do not overflow."""
    g = torch.Generator().manual_seed(0)
    m = torch.randn(4, 6, 6, generator=g, dtype=torch.float64)
    cov = m @ m.transpose(1, 2) * torch.tensor([1e-6, 1.0, 1e9, 0.0], dtype=torch.float64)[:, None, None]
    q, scale = quantize_expert(cov)
    assert q.dtype == torch.float16 and scale.dtype == torch.float32 and scale.shape == (4,)
    back = dequantize_expert(q, scale).double()
    for e in range(3):
        assert float((back[e] - cov[e]).norm() / cov[e].norm()) < 1e-3, e
    assert torch.equal(back[3], cov[3])

"""bench/serve.py's own arithmetic (no vLLM engine): the bytes one decode step reads, the KV
cache it gives vLLM, how it reads the machine's load and keeps cores busy, and how it merges
its two dense runs (its MoE timers: tests/vllm_plugin/test_probes.py). The serving numbers
themselves are the bench's (BENCHMARKS.md), not a test's."""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "serve.py"


@pytest.fixture(scope="module")
def serve():
    spec = importlib.util.spec_from_file_location("bench_serve", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_step_bytes_against_the_checkpoint_tensors(serve, tmp_path):
    """Non-expert bytes per step equal the synthetic checkpoint's non-expert tensors (the
    embedding excepted: a step reads one row of it), and the experts' share follows the
    expected number of experts a batch touches."""
    import torch

    layers, vocab = 1, 256
    serve.E, serve.H, serve.I = 8, 64, 32  # a small model of the same layout
    try:
        folders = serve.build(tmp_path, layers, vocab, [(4, 16, 8)])
        from safetensors.torch import load_file

        dense = load_file(str(folders["dense"] / "model.safetensors"))
        other = sum(t.numel() * 4 for n, t in dense.items() if ".experts." not in n and "embed_tokens" not in n)
        expert = 3 * serve.H * serve.I * 4
        assert serve.step_bytes(layers, vocab, None, 1) == pytest.approx(other + serve.K * expert)
        everything = serve.step_bytes(layers, vocab, None, 10_000)  # every expert touched
        assert everything == pytest.approx(other + serve.E * expert)
        rH, rI = 16, 8
        tucker = serve.step_bytes(layers, vocab, (4, rH, rI), 1)
        shared = 4 * (3 * serve.H * rH + 3 * serve.I * rI)
        assert tucker == pytest.approx(other + shared + serve.K * 3 * rH * rI * 4)
        assert torch.isfinite(torch.tensor(tucker))
    finally:
        serve.E, serve.H, serve.I = 128, 2048, 768


def test_qwen3_shapes_bytes_bound(serve):
    """At the bench's defaults (Qwen3-30B-A3B experts, 2 layers, vocabulary 4096) attention and
    the LM head bound a memory-bound decode at about 2x at batch 1, not the experts' 5.5x."""
    dense, tucker = (serve.step_bytes(2, 4096, r, 1) for r in (None, (64, 512, 256)))
    assert 1.9 < dense / tucker < 2.2
    moe_only = (8 * 3 * 2048 * 768) / (3 * 2048 * 512 + 3 * 768 * 256 + 8 * 3 * 512 * 256)
    assert 5.0 < moe_only < 6.0
    for r in (None, (64, 512, 256)):  # bfloat16 (--dtype bfloat16) reads half of every term
        assert serve.step_bytes(2, 4096, r, 8, "bfloat16") == pytest.approx(serve.step_bytes(2, 4096, r, 8) / 2)


def test_kv_cache_and_load_reading(serve):
    need = serve.MAX_SEQS * 320 * 2 * 2 * serve.KV_HEADS * serve.HEAD_DIM * 4
    assert serve.kv_cache_bytes(2, 320) >= need
    a = serve.machine_state()
    time.sleep(0.05)
    b = serve.machine_state()
    load = serve.load_during(a, b)
    assert load["seconds"] >= 0 and load["other_processes_cores"] >= 0 and load["load_before"] >= 0


def test_moe_ms_by_tokens_takes_the_calls_of_each_batch(serve):
    """The per-batch MoE time is the median of the calls with exactly that many tokens (a batch's
    prompts prefill in larger calls, which do not count); no call: None."""
    calls = [(1, 0.002), (3, 0.009), (1, 0.004), (3, 0.006), (1, 0.003), (48, 0.5)]
    ms = serve.moe_ms_by_tokens(calls, (1, 3, 8))
    assert ms[1] == pytest.approx(3.0) and ms[3] == pytest.approx(7.5) and ms[8] is None


def test_decode_rate_leaves_the_prefill_out(serve):
    """Decode tokens/s counts the tokens after each request's first, over the span from the
    batch's first first token to its last token: a long prefill before the first token (here
    the first request's 5 s in the queue) does not enter it."""
    from types import SimpleNamespace as M

    reqs = [M(num_generation_tokens=11, first_token_ts=105.0, last_token_ts=107.0),
            M(num_generation_tokens=11, first_token_ts=105.5, last_token_ts=108.0)]
    assert serve.decode_rate(reqs) == pytest.approx(20 / 3.0)
    with pytest.raises(RuntimeError, match="disable_log_stats"):
        serve.decode_rate([None])


def test_faster_baseline_can_only_lower_the_ratios(serve):
    """The dense baseline merged from its first and last runs takes, rate by rate, the faster
    run and, call by call, the shorter MoE time (a missing time is not a time), and keeps both."""
    def run(scale, moe):
        r = {k: 100.0 * scale for k in serve.RATES}
        r.update(moe_ms_per_call=moe, machine={"load_before": 1.0}, runs={}, weight_bytes={"all": 7})
        return r

    first = run(1.0, {"b1": 3.0, "b8": None, "b32": 40.0})
    first["decode_b8_tokens_per_s"] = 500.0  # the first run faster at one rate
    again = run(1.5, {"b1": 2.0, "b8": 13.0, "b32": None})
    d = serve.faster_baseline(first, again)
    assert d["decode_b1_tokens_per_s"] == 150.0 and d["decode_b8_tokens_per_s"] == 500.0
    assert d["prefill_tokens_per_s"] == 150.0 and d["decode_b32_wall_tokens_per_s"] == 150.0
    assert d["moe_ms_per_call"] == {"b1": 2.0, "b8": 13.0, "b32": 40.0}
    assert d["weight_bytes"] == {"all": 7}
    assert d["baseline_runs"]["first"]["decode_b8_tokens_per_s"] == 500.0
    assert d["baseline_runs"]["last"]["moe_ms_per_call"]["b1"] == 2.0
    for k in serve.RATES:  # never slower than either run
        assert d[k] >= max(first[k], again[k])


def test_busy_cores_keep_a_core_busy_and_stop(serve):
    """``--busy``: each process keeps about one core busy while the bench runs (seen by the same
    /proc/stat reading the tables report), and none outlives the block."""
    with serve.busy_cores(1) as procs:
        time.sleep(0.3)  # started
        a = serve.machine_state()
        time.sleep(1.0)
        load = serve.load_during(a, serve.machine_state())
        assert all(p.poll() is None for p in procs)
    assert load["other_processes_cores"] > 0.3
    assert all(p.poll() is not None for p in procs)
    with pytest.raises(ValueError):  # stopped on an error inside too
        with serve.busy_cores(1) as procs:
            raise ValueError
    assert all(p.poll() is not None for p in procs)

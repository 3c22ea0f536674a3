"""bench/serve.py's own arithmetic (no vLLM engine): the bytes one decode step reads, the KV
cache it gives vLLM, and how it reads the machine's load. The serving numbers themselves are
the bench's (BENCHMARKS.md), not a test's."""

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

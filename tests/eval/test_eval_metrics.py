"""``evaluate``'s perplexity, KL and top-1 agreement against independent computations.

The references use transformers' own model (``AutoModelForCausalLM``; for a Tucker
model, the original with its routed experts replaced by the float64 reconstruction
from the factors), the same tokenizer and the same non-overlapping windows: mean
cross-entropy over each window's ``seqlen - 1`` predictions, exp; KL(original || Tucker)
summed over the whole vocabulary in float64.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import model_refs as M
from tuckerize.demo import DEMO_DIR
from tuckerize.evaluate import evaluate
from tuckerize.evaluate.scoring import coarse_kl


def _windows(folder: Path, text: str, seqlen: int, max_windows: int | None) -> torch.Tensor:
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(str(folder))(text, add_special_tokens=False)["input_ids"]
    n = len(ids) // seqlen
    if max_windows:
        n = min(n, max_windows)
    return torch.tensor(ids[: n * seqlen]).view(n, seqlen)


@torch.no_grad()
def _logprobs(model, windows: torch.Tensor) -> torch.Tensor:
    """[n, seqlen - 1, V] float64 next-token log-probabilities, one window at a time."""
    return torch.stack([model(w[None]).logits[0, :-1].double().log_softmax(-1) for w in windows])


def _reference(src: Path, tucker: Path, text: str, seqlen: int, max_windows: int | None) -> dict[str, float]:
    windows = _windows(src, text, seqlen, max_windows)
    logp = _logprobs(M.load_hf_reference(src), windows)
    logq = _logprobs(M.load_hf_reference(src, tucker), windows)
    target = windows[:, 1:, None]
    nll_p = -logp.gather(-1, target).mean()
    nll_q = -logq.gather(-1, target).mean()
    kl = (logp.exp() * (logp - logq)).sum(-1).mean()
    top1 = (logp.argmax(-1) == logq.argmax(-1)).double().mean()
    return {"base_ppl": math.exp(nll_p), "tucker_ppl": math.exp(nll_q), "kl": float(kl), "top1": float(top1),
            "windows": len(windows), "tokens": windows[:, 1:].numel()}


def _rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


def test_demo_perplexity_and_kl_equal_transformers(demo_tuckers):
    text = (DEMO_DIR / "heldout.txt").read_text()
    ref = _reference(DEMO_DIR, demo_tuckers["light"], text, 256, 4)
    # kl_topk = vocabulary: the KL is exact, so it must equal the float64 sum over the vocabulary.
    report = evaluate(str(demo_tuckers["light"]), "demo", seqlen=256, max_windows=4, kl_topk=4096,
                      layer_tokens=16, use_cache=False)
    assert report["text"]["windows"] == 4 and report["text"]["tokens_scored"] == 4 * 255 == ref["tokens"]
    assert report["settings"]["kl"] == "exact"
    assert _rel(report["baseline_result"]["perplexity"], ref["base_ppl"]) < 1e-3
    assert _rel(report["tucker_result"]["perplexity"], ref["tucker_ppl"]) < 1e-3
    assert _rel(report["fidelity"]["kl_mean"], ref["kl"]) < 1e-3
    assert abs(report["fidelity"]["top1_agreement"] - ref["top1"]) <= 2 / ref["tokens"]  # near-ties at most
    # The test can tell a Tucker model from the original.
    assert _rel(ref["tucker_ppl"], ref["base_ppl"]) > 1e-3 and ref["kl"] > 1e-3


def test_tiny_perplexity_kl_top1_equal_transformers(tiny_eval):
    text = tiny_eval["text"].read_text()
    ref = _reference(tiny_eval["src"], tiny_eval["low"], text, 32, 5)
    report = evaluate(str(tiny_eval["low"]), str(tiny_eval["src"]), text=str(tiny_eval["text"]), seqlen=32,
                      max_windows=5, kl_topk=64, layer_tokens=16, use_cache=False)
    assert report["settings"]["kl"] == "exact"
    assert report["text"]["windows"] == 5 and report["text"]["tokens_scored"] == ref["tokens"]
    assert _rel(report["baseline_result"]["perplexity"], ref["base_ppl"]) < 1e-3
    assert _rel(report["tucker_result"]["perplexity"], ref["tucker_ppl"]) < 1e-3
    assert _rel(report["fidelity"]["kl_mean"], ref["kl"]) < 1e-3
    assert abs(report["fidelity"]["top1_agreement"] - ref["top1"]) <= 1 / ref["tokens"]
    assert ref["kl"] > 1e-2 and ref["top1"] < 0.99


@pytest.mark.parametrize("arch", ["deepseek_v3", "qwen3_next"])
def test_transformers_runtime_equals_transformers_reference(arch, hf_arch_eval, tiny_eval):
    """Architectures without a native runtime go through transformers (runtime auto -> hf),
    per-layer errors included (transformers' MoE blocks take [batch, seq, hidden])."""
    src, tucker = hf_arch_eval(arch)
    text = tiny_eval["text"].read_text()
    ref = _reference(src, tucker, text, 32, 3)
    report = evaluate(str(tucker), str(src), text=str(tiny_eval["text"]), seqlen=32, max_windows=3, kl_topk=64,
                      layer_tokens=16, use_cache=False)
    assert report["settings"]["runtime"] == "hf"
    assert _rel(report["baseline_result"]["perplexity"], ref["base_ppl"]) < 1e-3
    assert _rel(report["tucker_result"]["perplexity"], ref["tucker_ppl"]) < 1e-3
    assert _rel(report["fidelity"]["kl_mean"], ref["kl"]) < 1e-3 and ref["kl"] > 1e-3
    assert abs(report["fidelity"]["top1_agreement"] - ref["top1"]) <= 1 / ref["tokens"]
    errs = report["fidelity"]["layer_relative_error"]
    assert set(errs) == {str(i) for i in M.moe_layers(src)}
    assert all(0.01 < e < 2 for e in errs.values()), errs


def test_native_and_transformers_runtimes_agree(tiny_eval):
    kw = dict(text=str(tiny_eval["text"]), seqlen=32, max_windows=3, kl_topk=64, layer_tokens=16, use_cache=False)
    native = evaluate(str(tiny_eval["low"]), str(tiny_eval["src"]), runtime="native", **kw)
    hf = evaluate(str(tiny_eval["low"]), str(tiny_eval["src"]), runtime="hf", **kw)
    assert (native["settings"]["runtime"], hf["settings"]["runtime"]) == ("native", "hf")
    for a, b in ((native["baseline_result"]["perplexity"], hf["baseline_result"]["perplexity"]),
                 (native["tucker_result"]["perplexity"], hf["tucker_result"]["perplexity"]),
                 (native["fidelity"]["kl_mean"], hf["fidelity"]["kl_mean"]),
                 *((native["fidelity"]["layer_relative_error"][k], v)
                   for k, v in hf["fidelity"]["layer_relative_error"].items())):
        assert _rel(a, b) < 1e-4, (a, b)
    assert native["fidelity"]["top1_agreement"] == hf["fidelity"]["top1_agreement"]


def test_full_ranks_are_lossless_low_ranks_are_not(tiny_eval):
    kw = dict(text=str(tiny_eval["text"]), seqlen=32, max_windows=4, kl_topk=64, layer_tokens=32)
    full = evaluate(str(tiny_eval["full"]), str(tiny_eval["src"]), **kw)
    assert full["settings"]["kl"] == "exact"
    assert abs(full["fidelity"]["kl_mean"]) < 1e-7, full["fidelity"]
    assert full["fidelity"]["top1_agreement"] == 1.0
    assert abs(full["perplexity_ratio"] - 1) < 1e-5
    errs = full["fidelity"]["layer_relative_error"]
    assert set(errs) == {"0", "1"} and max(errs.values()) < 1e-5
    low = evaluate(str(tiny_eval["low"]), str(tiny_eval["src"]), **kw)
    assert low["baseline_result"]["cached"]  # same model, text and windows as above
    assert low["baseline_result"]["perplexity"] == full["baseline_result"]["perplexity"]
    assert low["fidelity"]["kl_mean"] > 1e-2
    assert low["fidelity"]["top1_agreement"] < 1.0
    assert min(low["fidelity"]["layer_relative_error"].values()) > 1e-2


def test_coarse_kl_exact_when_topk_covers_vocab_and_lower_bound_otherwise():
    g = torch.Generator().manual_seed(0)
    V, T = 50, 40
    logp = (3 * torch.randn(T, V, generator=g, dtype=torch.float64)).log_softmax(-1)
    logq = (logp + 0.5 * torch.randn(T, V, generator=g, dtype=torch.float64)).log_softmax(-1)
    exact = (logp.exp() * (logp - logq)).sum(-1)
    lp, idx = logp.float().topk(V, dim=-1)
    got = coarse_kl(lp, idx.to(torch.int32), logq.float())
    assert float((got.double() - exact).abs().max()) < 1e-5 * float(exact.abs().max())
    # Identical distributions: exactly 0 up to float32 rounding, not a rest-bucket artefact.
    same = coarse_kl(lp, idx.to(torch.int32), logp.float())
    assert float(same.abs().max()) < 1e-7
    for k in (1, 5, 20, 49):
        lp, idx = logp.float().topk(k, dim=-1)
        bound = coarse_kl(lp, idx.to(torch.int32), logq.float()).double()
        # log-sum inequality: merging the tail into one bucket never increases KL
        assert bool((bound <= exact + 1e-5).all()) and bool((bound >= -1e-6).all()), k
    lp, idx = logp.float().topk(45, dim=-1)
    assert float(coarse_kl(lp, idx.to(torch.int32), logq.float()).double().mean()) > 0.9 * float(exact.mean())


@pytest.mark.slow
def test_demo_full_heldout_perplexity_matches_training_record(demo_tuckers):
    """The demo's training recorded 54.7389 on 199 windows of 256 tokens (train_info.json)."""
    import json

    info = json.loads((DEMO_DIR / "train_info.json").read_text())
    report = evaluate(str(demo_tuckers["light"]), "demo", seqlen=256, layer_tokens=16, use_cache=False)
    assert report["text"]["windows"] == info["heldout_windows"] == 199
    assert _rel(report["baseline_result"]["perplexity"], info["heldout_perplexity"]) < 1e-3

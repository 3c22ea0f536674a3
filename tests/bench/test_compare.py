"""The comparison bench's baselines (bench/compare.py, bench/comparison/) against float64 references
on a tiny model."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import compare  # noqa: E402


@pytest.fixture(scope="module")
def dense(tiny_factory):
    return compare.Dense(tiny_factory("qwen3_moe"))


def _ref_rtn(w: np.ndarray, bits: int, group: int) -> np.ndarray:
    out = np.zeros_like(w)
    qmax = 2**bits - 1
    g = min(group, w.shape[1])
    for r in range(w.shape[0]):
        for c0 in range(0, w.shape[1], g):
            blk = w[r, c0 : c0 + g]
            scale = float(np.float16(max((blk.max() - blk.min()) / qmax, 1e-12)))
            zero = float(np.float16(np.clip(np.round(-blk.min() / scale), 0, qmax)))
            q = np.clip(np.round(blk / scale) + zero, 0, qmax)
            out[r, c0 : c0 + g] = (q - zero) * scale
    return out


@pytest.mark.parametrize("bits", [4, 3, 2])
def test_rtn_matches_reference_and_counts_bytes(dense, bits):
    t, nbytes = compare.rtn(dense, bits, group=8)
    for p in ("gate", "down"):
        name = dense.name(dense.layers[0], p, 1)
        w = dense.tensors[name].double().numpy()
        ref = _ref_rtn(w, bits, 8)
        assert np.linalg.norm(t[name].double().numpy() - ref) / np.linalg.norm(ref) < 1e-6
    E, H, I = dense.E, dense.H, dense.I
    per = 3 * H * I * bits // 8 + (2 * I * (H // 8) + H * (I // 8)) * 4
    assert nbytes == per * E * len(dense.layers)


def test_whitened_svd_is_better_on_its_inputs_plain_svd_in_weights(dense):
    g = torch.Generator().manual_seed(0)
    E, H, I = dense.E, dense.H, dense.I
    stats = {}
    for layer in dense.layers:
        xh = torch.randn(E, 200, H, generator=g, dtype=torch.float64) * torch.logspace(0, -2, H, dtype=torch.float64)
        xa = torch.randn(E, 200, I, generator=g, dtype=torch.float64) * torch.logspace(0, -2, I, dtype=torch.float64)
        stats[layer] = {"cov_h": xh.transpose(1, 2) @ xh, "cov_a": xa.transpose(1, 2) @ xa, "_xh": xh, "_xa": xa}
    rank = 4
    plain, nb_plain = compare.svd(dense, rank, None)
    white, nb_white = compare.svd(dense, rank, stats, ridge=1e-8)
    assert nb_plain == nb_white == E * 3 * rank * (H + I) * 2 * len(dense.layers)
    layer, e = dense.layers[0], 2
    for p, x in (("gate", stats[layer]["_xh"][e]), ("down", stats[layer]["_xa"][e])):
        n = dense.name(layer, p, e)
        w = dense.tensors[n].double()
        out_err = {k: float(((w - t[n].double()) @ x.T).norm()) for k, t in (("plain", plain), ("white", white))}
        w_err = {k: float((w - t[n].double()).norm()) for k, t in (("plain", plain), ("white", white))}
        assert out_err["white"] < out_err["plain"] and w_err["plain"] < w_err["white"]
        # the plain one is the Eckart-Young optimum: its error is the tail of the spectrum
        s = torch.linalg.svdvals(w)
        assert abs(w_err["plain"] - float(s[rank:].norm())) < 1e-5 * float(s.norm())


def test_prune_keeps_the_highest_scores_and_loads(dense, tmp_path):
    from tuckerize.runtime.loader import TensorSource
    from tuckerize.runtime.model import CausalLM

    score = {layer: torch.arange(dense.E, dtype=torch.float64).flip(0) for layer in dense.layers}  # expert 0 best
    keep = dense.E // 2
    t, config, nbytes = compare.prune(dense, keep, score)
    layer = dense.layers[0]
    assert torch.equal(t[dense.name(layer, "up", 1)], dense.tensors[dense.name(layer, "up", 1)])
    assert dense.name(layer, "up", keep) not in t
    router = dense.spec.arch.router_name(layer)
    assert torch.equal(t[router], dense.tensors[router][:keep])
    assert nbytes == keep * 3 * dense.H * dense.I * 2 * len(dense.layers)
    folder = dense.write(tmp_path / "pruned", t, config)
    with torch.no_grad():
        logits = CausalLM(TensorSource.open(folder), dense_experts=True)(torch.arange(10)[None])
    assert logits.shape == (1, 10, dense.tensors["lm_head.weight"].shape[0]) and torch.isfinite(logits).all()


def test_merge_is_the_frequency_weighted_average_of_each_cluster(dense):
    g = torch.Generator().manual_seed(0)
    E = dense.E
    stats = {}
    for layer in dense.layers:
        base = torch.randn(E // 2, 3, dense.H, generator=g)
        feat = base.repeat_interleave(2, 0) + 1e-3 * torch.randn(E, 3, dense.H, generator=g)  # pairs (0,1), (2,3)...
        stats[layer] = {"feat": feat, "freq": torch.arange(1, E + 1, dtype=torch.float64)}
    assert sorted(sorted(c) for c in compare.clusters(stats[dense.layers[0]]["feat"], E // 2)) == \
        [[2 * i, 2 * i + 1] for i in range(E // 2)]
    t, nbytes = compare.merge(dense, E // 2, stats)
    layer = dense.layers[0]
    a, b = (dense.tensors[dense.name(layer, "down", e)].double() for e in (2, 3))
    want = (3 * a + 4 * b) / 7
    for e in (2, 3):
        got = t[dense.name(layer, "down", e)].double()
        assert float((got - want).norm() / want.norm()) < 1e-6
    assert nbytes == E // 2 * 3 * dense.H * dense.I * 2 * len(dense.layers)


def test_collect_stats_counts_the_routed_pairs_transformers_routes(tiny_factory):
    """Per-expert routed-token counts of the layer-by-layer statistics pass equal the top-k
    of transformers' own router logits on the same calibration windows."""
    from transformers import AutoModelForCausalLM

    from tuckerize.calibration.tokens import calibration_tokens
    from tuckerize.text import read_text

    folder = tiny_factory("qwen3_moe")
    stats = compare.collect_stats(folder, samples=4, seqlen=32)
    tokens = calibration_tokens(read_text("demo", "calibration").text, folder, 4, 32)
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float64,
                                                 experts_implementation="eager").eval()
    with torch.no_grad():
        out = model(input_ids=tokens, output_router_logits=True, use_cache=False)
    k = model.config.num_experts_per_tok
    assert sorted(stats) == list(range(len(out.router_logits)))
    for layer, logits in enumerate(out.router_logits):
        want = torch.bincount(logits.topk(k, dim=-1).indices.flatten(), minlength=logits.shape[-1]).double()
        got = stats[layer]["freq"]
        assert float(got.sum()) == tokens.numel() * k
        assert float((got - want).abs().sum()) <= 0.01 * tokens.numel() * k  # float32 vs float64 near-ties
        H = compare.Dense(folder).H
        assert stats[layer]["cov_h"].shape == (logits.shape[-1], H, H)


def test_model_folder_adds_a_trained_model_and_refuses_bad_ones(tiny_factory, tmp_path, monkeypatch):
    import shutil

    from comparison import protocol

    monkeypatch.setattr(protocol, "MODELS", dict(protocol.MODELS))
    src = tiny_factory("qwen3_moe")
    with pytest.raises(SystemExit, match="lacks heldout.txt"):
        compare.add_models([f"big={src}"])
    folder = tmp_path / "big"
    shutil.copytree(src, folder)
    (folder / "heldout.txt").write_text("held out\n")
    with pytest.raises(SystemExit, match="new KEY"):
        compare.add_models([f"qwen3={folder}"])
    with pytest.raises(SystemExit, match="KEY=FOLDER"):
        compare.add_models([str(folder)])
    assert compare.add_models([f"big={folder}"]) == ["big"]
    assert protocol.MODELS["big"] == folder.resolve() and protocol.MODELS["qwen3"].name == "model"

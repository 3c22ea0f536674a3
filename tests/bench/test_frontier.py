"""The bytes frontier (bench/comparison/): byte counts of every quantised form from shapes, HQQ's
dequantisation against a float64 reference, the "equal or fewer bytes" test on synthetic rows,
and the tuckerize rows' budget (the product's stored bytes at or under it)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from comparison import frontier, quantisers, tucker  # noqa: E402
from comparison.dense import Dense  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
VENV = Path("/work/venvs/compare/bin/python")


@pytest.fixture(scope="module")
def dense(tiny_factory):
    return Dense(tiny_factory("qwen3_moe"))


@pytest.mark.parametrize("bits,group", [(2, 8), (3, 16), (3, 1000), (4, 8)])
def test_rtn_bytes_from_the_checkpoints_shapes(dense, bits, group):
    """bits per weight packed + a float16 scale and zero per group of min(group, in) along each row."""
    want = 0
    for name in [dense.name(layer, p, e) for layer in dense.layers for p in ("gate", "up", "down")
                 for e in range(dense.E)]:
        rows, cols = dense.tensors[name].shape
        groups_per_row = -(-cols // min(group, cols))
        want += -(-(rows * cols * bits) // 8) + rows * groups_per_row * (2 + 2)
    assert quantisers.quantised_bytes(dense, "rtn", bits, group) == want
    assert quantisers.rtn(dense, bits, group)[1] == want


def test_hqq_bytes_as_hqq_packs_its_codes():
    # 2 bits: four codes a byte; 4 bits: two; 3 bits: ten codes an int32, so 64 x 128 in groups of
    # 64 is 128 groups -> 13 int32 rows of 64 (3,328 bytes), plus float16 scale + zero per group
    assert quantisers.hqq_matrix_bytes(64, 128, 3, 64) == 13 * 64 * 4 + 128 * 4
    assert quantisers.hqq_matrix_bytes(64, 128, 2, 64) == 64 * 128 // 4 + 128 * 4
    assert quantisers.hqq_matrix_bytes(64, 128, 4, 128) == 64 * 128 // 2 + 64 * 4
    with pytest.raises(ValueError):
        quantisers.hqq_matrix_bytes(3, 5, 2, 8)


@pytest.mark.slow  # starts the baselines' environment (~15 s of imports on a quiet core)
@pytest.mark.skipif(not VENV.is_file(), reason="the baselines' environment (/work/venvs/compare) is not here")
def test_hqq_dequantisation_matches_float64_and_its_stored_bytes(tmp_path):
    """halfquadratic.hqq_quantise on a small matrix: HQQ's own codes, scale and zero (float16)
    dequantised in float64 give the same matrix, and the bytes are hqq_matrix_bytes'."""
    code = f"""
import sys, torch
sys.path.insert(0, {str(REPO / 'bench' / 'baselines')!r})
from halfquadratic import hqq_quantise
from hqq.core.quantize import Quantizer
torch.manual_seed(0)
w = torch.randn(48, 64) * torch.logspace(0, 1, 64)
out = {{}}
for bits in (2, 3):
    deq, nbytes = hqq_quantise(w, bits, 32)
    w_q, meta = Quantizer.quantize(w, nbits=bits, channel_wise=True, group_size=32, optimize=True, round_zero=False,
                                   axis=1, bitpack=False, device="cpu")
    out[bits] = dict(deq=deq, bytes=nbytes, q=w_q, scale=meta["scale"].half(), zero=meta["zero"].half())
torch.save(dict(w=w, out=out), {str(tmp_path / 'hqq.pt')!r})
"""
    subprocess.run([str(VENV), "-c", code], check=True, capture_output=True, env={"PYTHONPATH": str(REPO),
                                                                                  "OMP_NUM_THREADS": "1"})
    data = torch.load(tmp_path / "hqq.pt")
    w = data["w"].double().numpy()
    for bits, r in data["out"].items():
        q = r["q"].double().numpy()  # [groups, 32] codes in [0, 2**bits - 1]
        assert q.min() >= 0 and q.max() <= 2**bits - 1 and np.array_equal(q, np.round(q))
        ref = ((q - r["zero"].double().numpy()) * r["scale"].double().numpy()).reshape(w.shape)
        deq = r["deq"].double().numpy()
        assert np.linalg.norm(deq - ref) / np.linalg.norm(ref) < 1e-6
        assert r["bytes"] == quantisers.hqq_matrix_bytes(48, 64, bits, 32)
        rtn = quantisers.rtn_matrix(torch.from_numpy(w), bits, 32).double().numpy()
        assert np.linalg.norm(deq - w) < np.linalg.norm(rtn - w)  # its optimiser beats plain RTN in weights


def _row(family, ratio, ppl, kl, sel=None, method="m"):
    r = {"family": family, "method": method, "setting": f"{family} {ratio}", "bytes_ratio": ratio, "ppl": ppl, "kl": kl,
         "top1": 0.9}
    if sel is not None:
        r["select"] = {"ppl": sel, "kl": kl}
    return r


def test_frontier_check_equal_or_fewer_bytes():
    rows = [_row("tuckerize", 0.10, 50.0, 0.05, sel=60.0), _row("baseline", 0.14, 51.0, 0.04),
            _row("tuckerize", 0.15, 48.0, 0.03, sel=58.0), _row("baseline", 0.20, 47.0, 0.02),
            _row("original", 1.0, 45.0, 0.0)]
    chk = frontier.frontier_check(rows, 0.08, 0.30)
    by = {round(p["budget"], 4): p for p in chk["points"]}
    assert sorted(by) == [0.08, 0.10, 0.14, 0.15, 0.20, 0.30]
    assert not by[0.08]["met"] and by[0.08]["tucker"] is None  # nothing fits 8%
    assert by[0.10]["met"] and by[0.10]["best_ppl"] is None  # no baseline at <= 10%
    # at 14% the baseline has the lower KL (0.04 < 0.05): perplexity alone is not enough
    assert not by[0.14]["met"] and by[0.14]["ppl_margin_pct"] == pytest.approx(100 * (50 / 51 - 1))
    assert by[0.14]["kl_margin"] == pytest.approx(0.01)
    assert by[0.15]["met"] and by[0.15]["tucker"]["bytes_ratio"] == 0.15
    assert not by[0.20]["met"] and not by[0.30]["met"]  # the 20% baseline beats the 15% row
    assert chk["met_fraction"] == pytest.approx(((0.14 - 0.10) + (0.20 - 0.15)) / 0.22)


def test_frontier_check_chooses_on_the_selection_split():
    """A tuckerize row better on the report split but worse on the selection split is not picked."""
    rows = [_row("tuckerize", 0.10, 40.0, 0.01, sel=70.0), _row("tuckerize", 0.11, 52.0, 0.05, sel=60.0),
            _row("baseline", 0.09, 50.0, 0.04)]
    p = [p for p in frontier.frontier_check(rows, 0.08, 0.12)["points"] if p["budget"] == 0.12][0]
    assert p["tucker"]["bytes_ratio"] == 0.11 and not p["met"]
    rows[1]["select"]["ppl"] = 80.0
    p = [p for p in frontier.frontier_check(rows, 0.08, 0.12)["points"] if p["budget"] == 0.12][0]
    assert p["tucker"]["bytes_ratio"] == 0.10 and p["met"]


def test_tucker_request_is_ratio_today_bytes_once_the_product_takes_it():
    kw, cli = tucker.tucker_request(1000, {"factor_dtype": "int4"}, ratio=0.5)
    assert kw == {"factor_dtype": "int4", "ratio": 0.5} and cli == "--ratio 0.500 --factor-dtype int4"
    kw, cli = tucker.tucker_request(1000, {"factor_dtype": "int4"}, dense_bytes=4000)
    assert kw == {tucker.BYTES_KWARG: 0.25} and cli == "--bytes 0.25"  # the allocator chooses the storage
    assert tucker.product_takes_bytes()


def test_tucker_rows_fit_the_budget(dense, tmp_path, monkeypatch):
    """Today's ratio search: the product's stored bytes (its manifest) at or under the budget."""
    monkeypatch.setattr(tucker, "SAMPLES", 4)
    monkeypatch.setattr(tucker, "SEQLEN", 32)
    rows = tucker.TuckerRows(dense.folder, tmp_path, dense.dense_bytes, log=lambda m: None)
    rows.uses_bytes = False
    budget = int(0.2 * dense.dense_bytes)
    out, manifest, nbytes, cli = rows.fit(budget, {"factor_dtype": "int4"})
    assert nbytes == manifest["bytes"]["experts_stored"] <= budget and cli.startswith("--ratio")
    assert json.loads((out / "tuckerize_manifest.json").read_text())["bytes"]["experts_stored"] == nbytes
    assert nbytes > 0.5 * budget  # the search does not give most of the budget away


def test_hardness_table_is_the_rtn_perplexity_ratio():
    from comparison.report import hardness_table

    rows = [_row("original", 1.0, 50.0, 0.0, method="original"),
            {**_row("baseline", 0.15, 55.0, 0.1, method="RTN"), "bits": 2, "group": 64},
            {**_row("baseline", 0.2, 51.0, 0.02, method="RTN"), "bits": 3, "group": 128}]
    line = hardness_table({"m": rows}).splitlines()[-1].split("|")
    assert line[2].strip() == "50.00" and line[3].strip() == "+2.0% (0.020)" and line[7].strip() == "+10.0% (0.100)"

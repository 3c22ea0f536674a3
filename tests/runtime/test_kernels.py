"""Which kernel the Tucker experts run (tuckerize.runtime.kernels), chosen once at load, and
the kernels against each other and a float64 loop. The static-shape and no-host-sync
checks of every kernel are in test_static_forward.py; the Triton kernels' in
test_triton_kernels.py (interpreter).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tucker_refs as R
from sync_guard import guarded
from tuckerize.errors import InputError
from tuckerize.runtime.kernels import ENV, choose_kernel
from tuckerize.parallel import ParallelContext
from tuckerize.runtime.tucker_experts import TuckerExperts

TOL = 1e-5
E, H, I = 8, 32, 16
REPO = Path(__file__).resolve().parents[2]


def _routing(T, K, seed, experts=E):
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(experts, generator=g)[:K] for _ in range(T)])
    w = torch.rand(T, K, generator=g) + 0.1
    return idx, w


def _module(factors, layout="intermediate", rank=0, world=1, act="silu", kernel=None, dtype=None):
    m = TuckerExperts(E, H, I, R.PLAN, layout=layout, parallel=ParallelContext(rank=rank, world=world), act=act,
                      kernel=kernel, dtype=dtype)
    m.load_factors(factors)
    return m


@pytest.fixture(scope="module")
def factors():
    return R.random_factors(E, H, I, R.PLAN, seed=3)


def test_cpu_choice_by_dtype(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        k = choose_kernel("cpu", dtype, "silu")
        assert (k.name, k.capturable, k.bounded, k.align) == ("bags", True, True, 1), dtype
        assert "no host synchronisation" in k.describe()
    assert choose_kernel("cpu", torch.float64, "silu", "gather").bounded is False


def test_cpu_grouped_product_skips_empty_experts(monkeypatch):
    """On the CPU the grouped product runs one matrix product per expert that has rows (torch's
    own runs one per expert: 128 per projection when decoding one token); same result."""
    from tuckerize.runtime.kernels.torch_moe import grouped_op

    mm = grouped_op(torch.float32, "cpu")
    a = torch.randn(10, 12)
    b = torch.randn(6, 12, 5)
    offs = torch.tensor([0, 3, 3, 3, 9, 9], dtype=torch.int32)  # experts 1 and 4 only; row 9 unwritten
    guard = guarded(mm, a, b, offs)
    out = mm(a, b, offs)
    assert R.rel_err(torch.cat([a[:3] @ b[1], a[3:9] @ b[4]]), out[:9]) < 1e-6
    assert guard.violations == []  # opaque to the guard as to torch.compile: one op, static shape


def test_choice_from_environment_and_errors(monkeypatch):
    monkeypatch.setenv(ENV, "gather")
    assert choose_kernel("cpu", torch.float32, "silu").name == "gather"
    monkeypatch.setenv(ENV, "fastest")
    with pytest.raises(InputError, match=f"{ENV}=fastest is not one of") as err:
        choose_kernel("cpu", torch.float32, "silu")
    assert "\n" not in str(err.value)
    monkeypatch.delenv(ENV)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(InputError, match="CUDA"):
        choose_kernel("cpu", torch.float32, "silu", "triton")
    with pytest.raises(InputError, match="relu"):
        choose_kernel("cpu", torch.float32, "relu", "triton")


def test_module_chooses_once_at_load_and_after_a_move(factors, monkeypatch):
    """The choice is made when the factors are loaded and recorded; forwards do not choose
    again; ``.to(dtype)`` chooses and prepares again."""
    import tuckerize.runtime.tucker_experts as te

    m = TuckerExperts(E, H, I, R.PLAN, parallel=ParallelContext())
    assert m.kernel is None
    m.load_factors(factors)
    assert m.kernel.name == "bags" and m.kernel.dtype == torch.float32
    calls = []
    monkeypatch.setattr(te, "choose_kernel", lambda *a, **k: calls.append(a) or choose_kernel(*a, **k))
    x = torch.randn(5, H, generator=torch.Generator().manual_seed(0))
    idx, w = _routing(5, 2, seed=0)
    with torch.no_grad():
        ref = m(x, idx, w)
        m(x[:1], idx[:1], w[:1])
    assert calls == []
    m.to(torch.float64)
    assert len(calls) == 1 and m.kernel.dtype == torch.float64 and m._factors.dtype == torch.float64
    with torch.no_grad():
        assert R.rel_err(ref, m(x.double(), idx, w.double())) < TOL
    with pytest.raises(Exception, match="load"):
        TuckerExperts(E, H, I, R.PLAN)(x, idx, w)


@pytest.mark.parametrize("T,K", [(1, 2), (3, 3), (16, 2), (40, 3)])
@pytest.mark.parametrize("act,layout", [("silu", "intermediate"), ("gelu", "intermediate"), ("silu", "expert")])
def test_gather_equals_grouped_and_float64(factors, T, K, act, layout):
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(T))
    idx, w = _routing(T, K, seed=T + K)
    with torch.no_grad():
        grouped = _module(factors, layout, act=act, kernel="grouped")(x, idx, w)
        gather = _module(factors, layout, act=act, kernel="gather")(x, idx, w)
        bags = _module(factors, layout, act=act, kernel="bags")(x, idx, w)
    assert R.rel_err(grouped, gather) < TOL and R.rel_err(grouped, bags) < TOL
    act_fn = {"silu": torch.nn.functional.silu, "gelu": torch.nn.functional.gelu}[act]
    exact = R.moe_reference(x, idx, w, R.dense_from_flat({k: v.double() for k, v in factors.items()}), act=act_fn)
    for got in (grouped, gather, bags):
        assert R.rel_err(exact, got.double()) < TOL


@pytest.mark.parametrize("onednn", [True, False], ids=["onednn", "plain"])
@pytest.mark.parametrize("T", [2, 40])  # 2 tokens: the bags; 40 (120 pairs > BAG_ROWS * E): per-expert products
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_bags_both_paths_against_float64(factors, monkeypatch, onednn, T, dtype):
    """The CPU kernel's two paths (bags while decoding, one product per expert above
    ``BAG_ROWS`` pairs per expert), with its dense products through oneDNN (packed ``U_H``)
    or plain matrix products, equal a float64 einsum; the single-device module and the sum
    of three expert-split ranks alike."""
    import tuckerize.runtime.kernels.cpu_moe as cm

    if not onednn:
        monkeypatch.setattr(cm, "onednn_dtype", lambda dt: False)
    elif not cm.onednn_dtype(dtype):
        pytest.skip(f"oneDNN does not multiply {dtype} on this CPU")
    assert (T * 3 > cm.BAG_ROWS * E) == (T == 40)
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(T)).to(dtype)
    idx, w = _routing(T, 3, seed=T)
    fac = {k: v.to(dtype) for k, v in factors.items()}
    with torch.no_grad():
        m = _module(fac, kernel="bags")
        assert bool(m._factors.linear) == onednn and (m._factors.linear_bytes > 0) == onednn
        single = m(x, idx, w)
        parts = [_module(fac, "expert", r, 3, kernel="bags").partial(x, idx, w) for r in range(3)]
        split = m.finish(sum(parts))
    exact = R.moe_reference(x.double(), idx, w.double(), R.dense_from_flat({k: v.double() for k, v in fac.items()}))
    tol = TOL if dtype == torch.float32 else 2e-2
    assert R.rel_err(exact, single.double()) < tol and R.rel_err(exact, split.double()) < tol


@pytest.mark.parametrize("kernel", ["bags", "grouped", "gather"])
@pytest.mark.parametrize("world", [2, 3])
def test_expert_split_ranks_sum_to_single_device(factors, kernel, world):
    """Each rank computes only (grouped) or with weight 0 (gather) the pairs of other ranks'
    experts; the sum of the partials is the single-device output."""
    T, K = 5, 3
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(7))
    idx, w = _routing(T, K, seed=8)
    with torch.no_grad():
        ref = _module(factors)(x, idx, w)
        parts = [_module(factors, "expert", r, world, kernel=kernel).partial(x, idx, w) for r in range(world)]
        m = _module(factors, "expert", 0, world, kernel=kernel)
    assert R.rel_err(ref, m.finish(sum(parts))) < TOL
    assert R.rel_err(ref, m.finish(parts[0])) > 0.05


def test_gather_chunks_long_inputs(factors, monkeypatch):
    """Above its byte budget the gather kernel works in chunks of whole tokens (same result)."""
    import tuckerize.runtime.kernels.torch_moe as tm

    x = torch.randn(37, H, generator=torch.Generator().manual_seed(1))
    idx, w = _routing(37, 2, seed=2)
    m = _module(factors, kernel="gather")
    with torch.no_grad():
        whole = m(x, idx, w)
        monkeypatch.setattr(tm, "GATHER_BYTES", 1)  # one token per chunk
        guard = guarded(m, x, idx, w)
        chunked = m(x, idx, w)
    assert guard.violations == []
    assert sum(1 for name, _ in guard.trace if name == "bmm") == 3 * 37
    assert R.rel_err(whole, chunked) < TOL


def test_native_runtime_installs_nothing(tucker_factory):
    """CausalLM's MoE layers run the module's own (static) forward with the kernel chosen at
    load; the logits equal transformers' on the reconstructed dense weights."""
    import model_refs as M
    from tuckerize.runtime.loader import TensorSource
    from tuckerize.runtime.model import CausalLM

    src, tucker = tucker_factory("qwen3_moe")
    ids = torch.randint(0, 64, (1, 10), generator=torch.Generator().manual_seed(0))
    model = CausalLM(TensorSource.open(tucker, parallel=ParallelContext()), dtype=torch.float32).eval()
    experts = [b.experts for b in model.moe_blocks().values()]
    assert experts and all(e.kernel.name == "bags" for e in experts)
    with torch.no_grad():
        got = model(ids)
    assert R.rel_err(M.hf_logits(src, ids, tucker=tucker), got) < 1e-4


# ------------------------------------------------------------------ bench/gpu.py dry run


def test_gpu_bench_dry_run(tmp_path):
    """bench/gpu.py on tiny shapes on the CPU (Triton interpreted, CUDA graphs skipped with a
    note): every path runs, agrees with the reference, and the JSON and table are written."""
    out = tmp_path / "gpu.json"
    cmd = [sys.executable, str(REPO / "bench" / "gpu.py"), "--dry-run", "--json", str(out), "--out", str(tmp_path)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["dry_run"] is True and res["cuda"] is False
    layer = res["layer"]
    assert "CUDA graphs skipped" in layer["graphs"]  # the note saying why
    assert {row["tokens"] for row in layer["rows"]} == {1, 4, 32}
    assert {c["kernel"] for c in layer["capture"]} == {"grouped", "gather", "triton"}
    assert all(c["eager_vs_float32"] < 1e-5 for c in layer["capture"])
    for row in layer["rows"]:
        assert set(row["tucker_rel_err"]) == {"grouped", "gather", "triton"}
        assert all(v < 1e-5 for v in row["tucker_rel_err"].values()), row
        assert row["dense_rel_err"]["triton_fused"] < 1e-5
        assert all(row["ms"][k] > 0 for k in ("tucker/grouped", "tucker/triton", "dense/grouped", "dense/triton_fused"))
    assert all(t["met"] is None for t in layer["targets"].values())  # no verdict without a GPU
    assert "| ranks | tokens |" in r.stdout


@pytest.mark.parametrize("layout,world,rank", [("intermediate", 1, 0), ("expert", 3, 1)])
def test_padded_factors_change_nothing(factors, layout, world, rank):
    """Ranks zero-padded to 16 bytes (what torch's CUDA grouped_mm needs; PLAN's ranks 6, 7, 5
    and I=16 over 3 ranks are not multiples of 8) give the same ``s`` as unpadded ones."""
    from tuckerize.runtime.kernels.torch_moe import ExpertFactors, grouped_op, grouped_partial

    m = _module(factors, layout, rank, world)
    padded = ExpertFactors.prepare(m, align=8)
    assert padded.G["up"].shape[1:] == (16, 8) and padded.U_I["down"].shape[1] == 8
    assert padded.extra_bytes(m) > 0 and m._factors.extra_bytes(m) == m._factors.linear_bytes  # bags: no padding
    x = torch.randn(9, H, generator=torch.Generator().manual_seed(3))
    idx, w = _routing(9, 2, seed=4)
    expert = m.expert_slot[idx.reshape(-1)]
    xg, xu = x @ padded.U_H["gate"], x @ padded.U_H["up"]
    with torch.no_grad():
        got = grouped_partial(padded, grouped_op(torch.float32), xg, xu, expert, w.reshape(-1), 2)
        ref = m.partial(x, idx, w)
    assert got.shape == ref.shape
    assert R.rel_err(ref, got) < TOL or float(ref.abs().max()) == float(got.abs().max()) == 0.0

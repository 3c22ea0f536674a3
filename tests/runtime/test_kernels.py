"""The static-shape decode path (tuckerize.runtime.kernels) against the module's own path
and a float64 loop; proofs that it has no host synchronisation and static shapes.

References: :meth:`TuckerExperts.forward` with its own (sorted / gathered) path, and
tucker_refs.moe_reference (float64 loop over (token, slot) with dense weights rebuilt
from the factors). The Triton kernels' interpreter tests are in test_triton_kernels.py.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import tucker_refs as R
from tuckerize.errors import InputError
from tuckerize.runtime.kernels import ENV, DecodeDispatch, default_dispatch, install
from tuckerize.runtime.kernels.static import DecodeFactors, static_partial
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


def _module(factors, layout="intermediate", rank=0, world=1, act="silu"):
    m = TuckerExperts(E, H, I, R.PLAN, layout=layout, parallel=ParallelContext(rank=rank, world=world), act=act)
    m.load_factors(factors)
    return m


@pytest.fixture(scope="module")
def factors():
    return R.random_factors(E, H, I, R.PLAN, seed=3)


@pytest.mark.parametrize("T,K", [(1, 2), (3, 3), (16, 2), (40, 3)])
@pytest.mark.parametrize("act,layout", [("silu", "intermediate"), ("gelu", "intermediate"), ("silu", "expert")])
def test_static_matches_module_world1(factors, T, K, act, layout):
    m = _module(factors, layout, act=act)
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(T))
    idx, w = _routing(T, K, seed=T + K)
    with torch.no_grad():
        ref = m(x, idx, w)
        got = m.finish(static_partial(DecodeFactors.of(m), x, idx, w))
    assert R.rel_err(ref, got) < TOL
    act_fn = {"silu": torch.nn.functional.silu, "gelu": torch.nn.functional.gelu}[act]
    exact = R.moe_reference(x, idx, w, R.dense_from_flat({k: v.double() for k, v in factors.items()}), act=act_fn)
    assert R.rel_err(exact, got.double()) < TOL


@pytest.mark.parametrize("layout", ["intermediate", "expert"])
@pytest.mark.parametrize("world", [2, 3])
def test_static_over_simulated_ranks(factors, layout, world):
    """Each rank's static partial equals its own path's partial (other ranks' pairs weigh
    0 in the ``expert`` layout), and the sum over ranks is the single-device output."""
    T, K = 5, 3
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(7))
    idx, w = _routing(T, K, seed=8)
    with torch.no_grad():
        ref = _module(factors)(x, idx, w)
        parts = []
        for r in range(world):
            m = _module(factors, layout, r, world)
            own = m.partial(x, idx, w)
            s = static_partial(DecodeFactors.of(m), x, idx, w)
            assert R.rel_err(own, s) < TOL or float(own.abs().max()) == float(s.abs().max()) == 0.0
            parts.append(s)
        got = m.finish(sum(parts))
        alone = m.finish(parts[0])
    assert R.rel_err(ref, got) < TOL
    assert R.rel_err(ref, alone) > 0.05


def test_static_bfloat16(factors):
    m = TuckerExperts(E, H, I, R.PLAN, dtype=torch.bfloat16, parallel=ParallelContext())
    m.load_factors(factors)
    x = torch.randn(4, H, generator=torch.Generator().manual_seed(1)).bfloat16()
    idx, w = _routing(4, 2, seed=2)
    with torch.no_grad():
        got = m.finish(static_partial(DecodeFactors.of(m), x, idx, w.bfloat16()))
    exact = R.moe_reference(x, idx, w, R.dense_from_flat({k: v.double() for k, v in factors.items()}))
    assert got.dtype == torch.bfloat16
    assert R.rel_err(exact, got.double()) < 3e-2


# ------------------------------------------------------------------ no host sync, static shapes

#: ops whose output shape depends on values, or that copy a value to the host
FORBIDDEN = {"nonzero", "masked_select", "bincount", "unique", "_unique", "_unique2", "unique_consecutive",
             "unique_dim", "_local_scalar_dense", "masked_scatter", "argwhere", "nonzero_static"}


class StaticShapeMode(TorchDispatchMode):
    """Records every op's name and output shapes; flags host reads (``.item()``,
    ``.tolist()`` go through ``_local_scalar_dense``), value-dependent output shapes and
    boolean-mask indexing."""

    def __init__(self):
        super().__init__()
        self.trace: list[tuple[str, tuple]] = []
        self.violations: list[str] = []

    def __enter__(self):
        # .tolist() and .numpy() read memory without dispatching an op: watch them directly
        self._saved = {n: getattr(torch.Tensor, n) for n in ("tolist", "numpy")}
        for n, orig in self._saved.items():
            def watched(t, *a, _n=n, _orig=orig, **k):
                self.violations.append(_n)
                return _orig(t, *a, **k)
            setattr(torch.Tensor, n, watched)
        return super().__enter__()

    def __exit__(self, *exc):
        for n, orig in self._saved.items():
            setattr(torch.Tensor, n, orig)
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name in FORBIDDEN or (name == "repeat_interleave" and isinstance(args[0], torch.Tensor) and len(args) == 1):
            self.violations.append(name)
        if name in ("index", "index_put", "index_put_"):
            idx = args[1] if len(args) > 1 else []
            if any(isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in idx):
                self.violations.append(f"{name}[bool mask]")
        out = func(*args, **kwargs)
        outs = out if isinstance(out, (tuple, list)) else (out,)
        self.trace.append((name, tuple(tuple(o.shape) for o in outs if isinstance(o, torch.Tensor))))
        return out


def _trace(fn, *args):
    with torch.no_grad(), StaticShapeMode() as mode:
        fn(*args)
    return mode


def test_static_shape_mode_flags_host_reads_and_dynamic_shapes():
    t = torch.arange(6)
    for fn, flag in [(lambda: t.tolist(), "tolist"), (lambda: t.sum().item(), "_local_scalar_dense"),
                     (lambda: t.nonzero(), "nonzero"), (lambda: t[t > 2], "index[bool mask]"),
                     (lambda: torch.bincount(t), "bincount"), (lambda: t.unique(), "unique")]:
        mode = _trace(fn)
        assert any(flag in v for v in mode.violations), (flag, mode.violations)
    assert _trace(lambda: t[torch.tensor([0, 2])] * 2).violations == []
    assert torch.Tensor.tolist(t) == list(range(6))  # restored


@pytest.mark.parametrize("layout,world", [("intermediate", 1), ("expert", 3)])
def test_static_path_has_no_host_sync_and_static_shapes(factors, layout, world):
    """Same op sequence and shapes for very different routings (all pairs on one expert,
    spread, none on this rank), and no forbidden op; the module's own path trips the
    same check (so the check can fail)."""
    T, K = 6, 2
    m = _module(factors, layout, rank=world - 1, world=world)
    f = DecodeFactors.of(m)
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(0))
    spread, w = _routing(T, K, seed=1)
    one_expert = torch.stack([torch.tensor([7, 0])] * T)
    no_local = torch.stack([torch.tensor([0, 1])] * T)
    traces = []
    for idx in (spread, one_expert, no_local):
        mode = _trace(static_partial, f, x, idx, w)
        assert mode.violations == []
        traces.append(mode.trace)
    assert traces[0] == traces[1] == traces[2]
    m.gather_pairs = 0  # the module's sorted path: bincount and a per-expert loop
    own = _trace(m.partial, x, spread, w)
    assert own.violations, "the check should flag the module's own (sorted, grouped) path"


def test_static_path_compiles_fullgraph(factors):
    """torch.compile(fullgraph=True, dynamic=False) refuses graph breaks: a host read or a
    data-dependent shape would fail to compile."""
    torch._dynamo.reset()
    m = _module(factors, "expert", rank=1, world=2)
    f = DecodeFactors.of(m)
    compiled = torch.compile(lambda x, i, w: static_partial(f, x, i, w), fullgraph=True, dynamic=False, backend="eager")
    x = torch.randn(3, H, generator=torch.Generator().manual_seed(4))
    idx, w = _routing(3, 2, seed=5)
    with torch.no_grad():
        got = compiled(x, idx, w)
        ref = m.partial(x, idx, w)
    assert R.rel_err(ref, got) < TOL


# ------------------------------------------------------------------ hook and dispatch


def test_hook_dispatches_small_batches_only(factors, monkeypatch):
    import tuckerize.runtime.kernels as K

    calls = []

    def spy(f, *a):
        calls.append(a[0].shape[0])
        return static_partial(f, *a)

    monkeypatch.setattr(K, "static_partial", spy)
    m = _module(factors)
    m.decode_impl = DecodeDispatch("static", max_tokens=4, devices=("cpu",))
    x = torch.randn(9, H, generator=torch.Generator().manual_seed(0))
    idx, w = _routing(9, 2, seed=0)
    with torch.no_grad():
        ref = _module(factors)(x, idx, w)
        got_big = m(x, idx, w)
        got_small = m(x[:3], idx[:3], w[:3])
    assert calls == [3]
    assert R.rel_err(ref, got_big) < TOL and R.rel_err(ref[:3], got_small) < TOL


def test_dispatch_declines_other_devices_and_off(factors):
    m = _module(factors)
    x = torch.randn(2, H)
    idx, w = _routing(2, 2, seed=0)
    assert DecodeDispatch(devices=("cuda", "npu"))(m, x, idx, w) is None
    assert DecodeDispatch("off")(m, x, idx, w) is None
    assert DecodeDispatch("static", max_tokens=1)(m, x, idx, w) is None
    assert DecodeDispatch()(m, x, idx, w) is not None
    with pytest.raises(InputError, match="decode impl"):
        DecodeDispatch("fast")


def test_default_dispatch_from_environment(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    assert default_dispatch().impl == "auto" and default_dispatch().max_tokens == 16
    monkeypatch.setenv(ENV, "off")
    assert default_dispatch().impl == "off"
    monkeypatch.setenv(ENV, "fastest")
    with pytest.raises(InputError, match=ENV):
        default_dispatch()


def test_install_sets_every_tucker_module(factors):
    model = torch.nn.ModuleList([_module(factors), torch.nn.Linear(2, 2), _module(factors)])
    d = DecodeDispatch("static")
    assert install(model, d) == 2
    assert model[0].decode_impl is d and model[2].decode_impl is d


def test_native_runtime_uses_decode_path(tucker_factory, monkeypatch):
    """CausalLM installs the decode path: a short sequence goes through it (every MoE
    layer, once) and the logits equal transformers' on the reconstructed dense weights;
    with TUCKERIZE_DECODE=off the module's own path gives the same logits."""
    import model_refs as M
    import tuckerize.runtime.kernels as K
    from tuckerize.runtime.loader import TensorSource
    from tuckerize.runtime.model import CausalLM

    calls = []

    def spy(f, *a):
        calls.append(a[0].shape[0])
        return static_partial(f, *a)

    monkeypatch.setattr(K, "static_partial", spy)
    src, tucker = tucker_factory("qwen3_moe")
    ids = torch.randint(0, 64, (1, 10), generator=torch.Generator().manual_seed(0))

    def logits():
        model = CausalLM(TensorSource.open(tucker, parallel=ParallelContext()), dtype=torch.float32).eval()
        return model(ids), len(model.moe_blocks())

    monkeypatch.delenv(K.ENV, raising=False)  # auto: accelerators only (slower on the CPU)
    logits()
    assert calls == []
    monkeypatch.setenv(K.ENV, "static")
    got, n_moe = logits()
    assert n_moe > 0 and calls == [10] * n_moe
    ref = M.hf_logits(src, ids, tucker=tucker)
    assert R.rel_err(ref, got) < 1e-4
    monkeypatch.setenv(K.ENV, "off")
    own, _ = logits()
    assert len(calls) == n_moe
    assert R.rel_err(own, got) < TOL


# ------------------------------------------------------------------ bench/gpu.py dry run


def test_gpu_bench_dry_run(tmp_path):
    """bench/gpu.py's layer benchmark on tiny shapes on the CPU: every path runs and the
    JSON and table are written (the GPU numbers themselves need a GPU)."""
    out = tmp_path / "gpu.json"
    cmd = [sys.executable, str(REPO / "bench" / "gpu.py"), "--dry-run", "--ranks", "4,16,8", "--json", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    import json

    res = json.loads(out.read_text())
    assert res["dry_run"] is True
    rows = res["layer"]["rows"]
    assert {row["tokens"] for row in rows} == {1, 4}
    for row in rows:
        for r_ in row["tucker"].values():
            assert r_["static_ms"] > 0 and r_["torch_ms"] > 0
            assert r_["static_vs_torch_rel_err"] < 1e-4
            if res["layer"]["triton"]:
                assert r_["triton_vs_torch_rel_err"] < 1e-4
        if res["layer"]["triton"]:
            assert row["dense_triton_fused_moe_rel_err"] < 1e-4
    assert "| tokens |" in r.stdout

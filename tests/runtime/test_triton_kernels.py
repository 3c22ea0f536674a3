"""The Triton kernels (tuckerize.runtime.kernels.triton_moe) under Triton's interpreter,
against the module's grouped kernel (itself checked against float64 references in
test_tucker_experts.py and test_static_forward.py) and a float64 loop.

TRITON_INTERPRET must be set before triton is imported, so in the normal test process
one test runs this module again in a subprocess with the variable set; there the
kernel tests run and the launcher skips. Skips with a message when triton is not
installed or the interpreter cannot run.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"


def _triton_importable() -> str | None:
    try:
        import triton  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install
        return f"triton cannot be imported ({exc}); pip install triton (the dev extra) to run the kernel tests"
    return None


@pytest.mark.skipif(INTERPRETING, reason="this is the launcher; the kernel tests run here")
def test_kernels_under_interpreter():
    """Runs this module's kernel tests with TRITON_INTERPRET=1 in a subprocess."""
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", __file__],
                       capture_output=True, text=True, env=env, timeout=600)
    out = r.stdout[-6000:] + r.stderr[-3000:]
    if r.returncode == 5 or (r.returncode == 0 and " passed" not in r.stdout):
        pytest.skip("the Triton interpreter ran no kernel test:\n" + out)
    if r.returncode == 0 and "SKIPPED" in r.stdout and " passed" not in r.stdout:
        pytest.skip(out)
    assert r.returncode == 0, out


# ------------------------------------------------------------------ kernel tests (interpreter only)

interp = pytest.mark.skipif(not INTERPRETING, reason="runs under TRITON_INTERPRET=1 (launched above)")

if INTERPRETING:
    _why = _triton_importable()
    if _why:
        pytest.skip(_why, allow_module_level=True)
    import tucker_refs as R
    from tuckerize.runtime.kernels.triton_moe import pair_blocks, triton_partial
    from tuckerize.parallel import ParallelContext
    from tuckerize.runtime.tucker_experts import TuckerExperts

E, H, I = 8, 32, 24


def _setup(layout="intermediate", rank=0, world=1, dtype=torch.float32, act="silu", kernel="triton"):
    factors = R.random_factors(E, H, I, R.PLAN, seed=11)
    m = TuckerExperts(E, H, I, R.PLAN, layout=layout, parallel=ParallelContext(rank=rank, world=world),
                      act=act, dtype=dtype, kernel=kernel)
    m.load_factors(factors)
    assert m.kernel.name == kernel
    return m, factors


def _routing(T, K, seed):
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    w = torch.rand(T, K, generator=g) + 0.1
    return idx, w


def _partial(m, x, idx, w, grouped=None):
    """The Triton kernels on the module's own prepared factors, pair blocks as asked."""
    f = m._factors
    xg, xu = m._projected_input(x.to(f.dtype))
    return triton_partial(f, xg, xu, m.expert_slot[idx.reshape(-1)], w.reshape(-1).to(f.dtype), idx.shape[1],
                          grouped=grouped)


@interp
@pytest.mark.parametrize("T,K,grouped", [(1, 2, False), (5, 3, False), (5, 3, True), (24, 2, True), (40, 2, None)])
@pytest.mark.parametrize("act", ["silu", "gelu_pytorch_tanh"])
def test_triton_float32(T, K, grouped, act):
    m, factors = _setup(act=act)
    ref_m, _ = _setup(act=act, kernel="grouped")
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(T))
    idx, w = _routing(T, K, seed=T * 7 + K)
    got = _partial(m, x, idx, w, grouped)
    ref = ref_m.partial(x, idx, w)
    assert got.shape == ref.shape and got.dtype == ref.dtype
    assert R.rel_err(ref, got) < 1e-5
    act_fn = {"silu": torch.nn.functional.silu,
              "gelu_pytorch_tanh": lambda v: torch.nn.functional.gelu(v, approximate="tanh")}[act]
    exact = R.moe_reference(x, idx, w, R.dense_from_flat({k: v.double() for k, v in factors.items()}), act=act_fn)
    assert R.rel_err(exact, m.finish(got).double()) < 1e-5
    assert R.rel_err(exact, m(x, idx, w).double()) < 1e-5  # the module's forward runs the kernels itself


@interp
@pytest.mark.parametrize("grouped", [False, True])
def test_triton_bfloat16(grouped):
    m, factors = _setup(dtype=torch.bfloat16)
    x = torch.randn(6, H, generator=torch.Generator().manual_seed(2)).bfloat16()
    idx, w = _routing(6, 2, seed=3)
    got = _partial(m, x, idx, w.bfloat16(), grouped)
    assert got.dtype == torch.bfloat16
    exact = R.moe_reference(x, idx, w, R.dense_from_flat({k: v.double() for k, v in factors.items()}))
    assert R.rel_err(exact, m.finish(got).double()) < 3e-2


@interp
@pytest.mark.parametrize("layout", ["intermediate", "expert"])
def test_triton_simulated_ranks(layout):
    """Each rank's kernel partial equals the grouped kernel's; the sum over ranks is the
    single-device output (in ``expert``, sorted blocks stopping at the rank's pair count)."""
    world, T, K = 3, 4, 3
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(5))
    idx, w = _routing(T, K, seed=6)
    single, _ = _setup()
    ref = single(x, idx, w)
    parts = []
    for r in range(world):
        m, _ = _setup(layout, r, world)
        own, _ = _setup(layout, r, world, kernel="grouped")
        s = m.partial(x, idx, w)
        expect = own.partial(x, idx, w)
        assert R.rel_err(expect, s) < 1e-5 or float(s.abs().max()) == float(expect.abs().max()) == 0.0
        parts.append(s)
    assert R.rel_err(ref, m.finish(sum(parts))) < 1e-5


@interp
def test_pair_blocks_group_by_expert():
    """Grouped blocks: every pair of this rank exactly once, each block one expert, other
    ranks' pairs (index n_local) nowhere, compact slots 0..n-1 in expert order; the shapes
    depend on P and E only."""
    expert = torch.tensor([3, 4, 0, 3, 3, 1, 4, 0, 3])  # 4: another rank's expert
    rows, slots, be, n = pair_blocks(expert, 4, 2, grouped=True)
    assert rows.numel() == be.numel() * 2 and be.numel() == (9 + 1) // 2 + 4
    assert int(n) == 7
    seen, seen_slots = [], []
    for b in range(be.numel()):
        blk = [(int(p), int(q)) for p, q in zip(rows[2 * b: 2 * b + 2], slots[2 * b: 2 * b + 2]) if p >= 0]
        if int(be[b]) < 0:
            assert blk == []
        for p, _ in blk:
            assert int(expert[p]) == int(be[b])
        seen += [p for p, _ in blk]
        seen_slots += [q for _, q in blk]
    assert sorted(seen) == [i for i in range(9) if expert[i] < 4]
    assert seen_slots == list(range(7))  # blocks in expert order, slots compact
    rows2, slots2, be2, n2 = pair_blocks(torch.tensor([0] * 9), 4, 2, grouped=True)
    assert rows2.shape == rows.shape and be2.shape == be.shape and int(n2) == 9


# ------------------------------------------------------------------ ahead-of-time compile for a GPU (no GPU needed)

_CORE_SIG = {"a_ptr": "*bf16", "b_ptr": "*bf16", "out_ptr": "*bf16", "rows_ptr": "*i32", "slots_ptr": "*i32",
             "block_expert_ptr": "*i32",
             "w_ptr": "*bf16", "N": "i32", "KD": "i32", "TOPK": "i32", "stride_a": "i32", "stride_be": "i32",
             "stride_bk": "i32", "stride_bn": "i32", "stride_out": "i32"}
_ACT_SIG = {"zg_ptr": "*bf16", "zu_ptr": "*bf16", "ug_ptr": "*bf16", "uu_ptr": "*bf16", "ud_ptr": "*bf16",
            "y_ptr": "*fp32", "nvalid_ptr": "*i32", "I": "i32", "RG": "i32", "RU": "i32", "RD": "i32"}


@pytest.mark.skipif(INTERPRETING, reason="compiles in the launching process")
@pytest.mark.parametrize("kernel", ["core-gather", "core-scatter", "act"])
def test_kernels_compile_for_hopper(kernel):
    """The interpreter does not check what the GPU compiler does (dot shape limits,
    types, layouts): compile each kernel as the runtime launches it in bfloat16 at
    Qwen3-30B-A3B ranks for sm_90 (H100/H200), down to the cubin with triton's ptxas."""
    why = _triton_importable()
    if why:
        pytest.skip(why)
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from tuckerize.runtime.kernels.triton_moe import _act_kernel, _core_kernel

    if kernel.startswith("core"):
        scatter = kernel == "core-scatter"
        sig = dict(_CORE_SIG, out_ptr="*fp32" if scatter else "*bf16")
        const = {"BM": 16, "BN": 64, "BK": 64, "SCATTER": scatter, "DOT": tl.bfloat16, "PREC": "tf32"}
        fn = _core_kernel
    else:
        sig = dict(_ACT_SIG)
        const = {"BM": 16, "BI": 16, "RGP": 256, "RUP": 256, "RDP": 256, "ACT": 0, "DOT": tl.bfloat16, "PREC": "tf32"}
        fn = _act_kernel
    sig.update({k: "constexpr" for k in const})
    try:
        src = ASTSource(fn, sig, constexprs=const)
    except TypeError as exc:  # triton < 3.3 names the arguments differently
        pytest.skip(f"this triton ({triton.__version__}) has another ASTSource signature: {exc}")
    try:
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32))
    except (FileNotFoundError, ImportError) as exc:  # no bundled ptxas / backend on this platform
        pytest.skip(f"triton cannot compile for sm_90 here: {exc}")
    assert "cubin" in compiled.asm and len(compiled.asm["cubin"]) > 0

"""The Triton kernels (tuckerize.runtime.kernels.triton_moe) under Triton's interpreter,
against the torch reference (the static path, itself checked against the module and a
float64 loop in test_kernels.py) and a float64 loop.

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
    from tuckerize.runtime.kernels.static import DecodeFactors, static_partial
    from tuckerize.runtime.kernels.triton_moe import pair_blocks, triton_partial
    from tuckerize.parallel import ParallelContext
    from tuckerize.runtime.tucker_experts import TuckerExperts

E, H, I = 8, 32, 24


def _setup(layout="intermediate", rank=0, world=1, dtype=torch.float32, act="silu"):
    factors = R.random_factors(E, H, I, R.PLAN, seed=11)
    m = TuckerExperts(E, H, I, R.PLAN, layout=layout, parallel=ParallelContext(rank=rank, world=world),
                      act=act, dtype=dtype)
    m.load_factors(factors)
    return m, factors


def _routing(T, K, seed):
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    w = torch.rand(T, K, generator=g) + 0.1
    return idx, w


@interp
@pytest.mark.parametrize("T,K,grouped", [(1, 2, False), (5, 3, False), (5, 3, True), (24, 2, True)])
@pytest.mark.parametrize("act", ["silu", "gelu_pytorch_tanh"])
def test_triton_float32(T, K, grouped, act):
    m, factors = _setup(act=act)
    f = DecodeFactors.of(m)
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(T))
    idx, w = _routing(T, K, seed=T * 7 + K)
    got = triton_partial(f, x, idx, w, grouped=grouped)
    ref = static_partial(f, x, idx, w)
    assert got.shape == ref.shape and got.dtype == ref.dtype
    assert R.rel_err(ref, got) < 1e-5
    act_fn = {"silu": torch.nn.functional.silu,
              "gelu_pytorch_tanh": lambda v: torch.nn.functional.gelu(v, approximate="tanh")}[act]
    exact = R.moe_reference(x, idx, w, R.dense_from_flat({k: v.double() for k, v in factors.items()}), act=act_fn)
    assert R.rel_err(exact, m.finish(got).double()) < 1e-5


@interp
@pytest.mark.parametrize("grouped", [False, True])
def test_triton_bfloat16(grouped):
    m, factors = _setup(dtype=torch.bfloat16)
    f = DecodeFactors.of(m)
    x = torch.randn(6, H, generator=torch.Generator().manual_seed(2)).bfloat16()
    idx, w = _routing(6, 2, seed=3)
    got = triton_partial(f, x, idx, w.bfloat16(), grouped=grouped)
    ref = static_partial(f, x, idx, w.bfloat16())
    assert got.dtype == torch.bfloat16
    assert R.rel_err(ref.double(), got.double()) < 2e-2
    exact = R.moe_reference(x, idx, w, R.dense_from_flat({k: v.double() for k, v in factors.items()}))
    assert R.rel_err(exact, m.finish(got).double()) < 3e-2


@interp
@pytest.mark.parametrize("layout", ["intermediate", "expert"])
def test_triton_simulated_ranks(layout):
    """Each rank's kernel partial equals the torch reference's; the sum over ranks is the
    single-device output (other ranks' pairs skipped in the ``expert`` layout)."""
    world, T, K = 3, 4, 3
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(5))
    idx, w = _routing(T, K, seed=6)
    single, _ = _setup()
    ref = single(x, idx, w)
    parts = []
    for r in range(world):
        m, _ = _setup(layout, r, world)
        f = DecodeFactors.of(m)
        s = triton_partial(f, x, idx, w, grouped=(r == 1))
        assert R.rel_err(static_partial(f, x, idx, w), s) < 1e-5 or float(s.abs().max()) == 0.0
        parts.append(s)
    assert R.rel_err(ref, m.finish(sum(parts))) < 1e-5


@interp
def test_pair_blocks_group_by_expert():
    """Grouped blocks: every pair of this rank exactly once, each block one expert, other
    ranks' pairs (-1) nowhere; the shapes depend on P and E only."""
    expert = torch.tensor([3, -1, 0, 3, 3, 1, -1, 0, 3])
    rows, be = pair_blocks(expert, 4, 2, grouped=True)
    assert rows.numel() == be.numel() * 2 and be.numel() == (9 + 1) // 2 + 4
    seen = []
    for b in range(be.numel()):
        blk = [int(p) for p in rows[2 * b: 2 * b + 2] if p >= 0]
        if int(be[b]) < 0:
            assert blk == []
        for p in blk:
            assert int(expert[p]) == int(be[b])
        seen += blk
    assert sorted(seen) == [i for i in range(9) if expert[i] >= 0]
    rows2, be2 = pair_blocks(torch.tensor([0] * 9), 4, 2, grouped=True)
    assert rows2.shape == rows.shape and be2.shape == be.shape


# ------------------------------------------------------------------ ahead-of-time compile for a GPU (no GPU needed)

_CORE_SIG = {"a_ptr": "*bf16", "b_ptr": "*bf16", "out_ptr": "*bf16", "rows_ptr": "*i32", "block_expert_ptr": "*i32",
             "w_ptr": "*bf16", "N": "i32", "KD": "i32", "TOPK": "i32", "stride_a": "i32", "stride_be": "i32",
             "stride_bk": "i32", "stride_bn": "i32", "stride_out": "i32"}
_ACT_SIG = {"zg_ptr": "*bf16", "zu_ptr": "*bf16", "ug_ptr": "*bf16", "uu_ptr": "*bf16", "ud_ptr": "*bf16",
            "y_ptr": "*fp32", "P": "i32", "I": "i32", "RG": "i32", "RU": "i32", "RD": "i32"}


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

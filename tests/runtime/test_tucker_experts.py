"""The Tucker experts module and the MoE block against independent references.

References never go through the runtime under test: transformers' own MoE blocks and
experts modules (with dense weights rebuilt from the Tucker factors by one float64
einsum), a plain float64 loop over (token, expert) pairs, and float64 einsums of the
factors. Each defect of the first draft (shared/seeds/README.md) has its own test.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch.utils.flop_counter import FlopCounterMode

import tucker_refs as R
from tuckerize.arch import FACTORS, PROJECTIONS
from tuckerize.errors import ShardError
from tuckerize.format import TuckerCheckpoint
from tuckerize.runtime import tucker_experts as te
from tuckerize.runtime.loader import TensorSource, build_moe_block
from tuckerize.parallel import EXPERT_SPLIT_LAYOUTS, LAYOUTS, ParallelContext, split_sizes
from tuckerize.runtime.tucker_experts import TuckerExperts, TuckerFactors

TOL = 1e-5

#: (architecture, config overrides). DeepSeek routers with n_group > 1 so that
#: group-limited routing is exercised (the test checks it changes some choices). V2's
#: "group_limited_greedy" scores a group by its best expert, so with top_k=2 it only
#: differs from plain top-k when topk_group < top_k: topk_group=1 there; V3 scores a
#: group by its top-2 sum and uses topk_group=2.
ARCH_CASES = [
    ("qwen3_moe", {}),
    ("qwen3_next", {}),
    ("qwen2_moe", {}),
    ("mixtral", {}),
    ("olmoe", {}),
    ("deepseek_v2", {}),
    ("deepseek_v2", dict(n_group=4, topk_group=1, topk_method="group_limited_greedy", routed_scaling_factor=1.5)),
    ("deepseek_v3", dict(n_group=4, topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True)),
]


def _case_id(case) -> str:
    arch, ov = case
    return arch + ("-" + ov.get("topk_method", "group") if ov else "")


# ------------------------------------------------------------------ whole MoE block vs transformers


def _randomise_routers(block, hf_mlp, seed: int) -> None:
    """Same random router weights (and DeepSeek-V3 score correction bias) in both blocks.
    Unit-scale weights keep the top-k choice well separated from ties."""
    g = torch.Generator().manual_seed(1000 + seed)
    w = torch.randn(tuple(block.gate.weight.shape), generator=g)
    with torch.no_grad():
        block.gate.weight.copy_(w)
        hf_mlp.gate.weight.copy_(w.to(hf_mlp.gate.weight.dtype))
        hf_bias = getattr(hf_mlp.gate, "e_score_correction_bias", None)
        if hf_bias is not None:
            assert block.gate.e_score_correction_bias is not None, "DeepSeek-V3 router lost its correction bias"
            b = 0.3 * torch.randn(w.shape[0], generator=g)
            block.gate.e_score_correction_bias.copy_(b)
            hf_bias.copy_(b)


def _ungrouped_choice(arch: str, x: torch.Tensor, gate, k: int) -> torch.Tensor:
    """Sorted top-k experts per token that DeepSeek's router would pick without groups."""
    logits = x @ gate.weight.T
    if arch == "deepseek_v2":
        choice = torch.softmax(logits, dim=-1)
    else:
        choice = torch.sigmoid(logits) + gate.e_score_correction_bias
    return torch.sort(torch.topk(choice, k, dim=-1).indices, dim=-1).values


@pytest.mark.parametrize("case", ARCH_CASES, ids=_case_id)
def test_block_matches_transformers(case, tucker_factory):
    arch, overrides = case
    src, tucker = tucker_factory(arch, **overrides)
    hf = R.load_hf(src, torch.float32)
    source = TensorSource.open(tucker, parallel=ParallelContext())
    assert source.is_tucker
    spec = source.spec
    E, H, I = spec.shape
    assert H != I
    for layer in spec.moe_layers:
        block = build_moe_block(source, layer)
        hf_mlp = hf.model.layers[layer].mlp
        dense = R.tucker_dense(tucker, layer)
        for p in PROJECTIONS:
            assert tuple(dense[p].shape) == (E, H, I)
        R.install_dense(hf_mlp.experts, dense)
        _randomise_routers(block, hf_mlp, layer)
        group_changed = 0
        for seed in range(3):
            g = torch.Generator().manual_seed(seed)
            x = torch.randn(2 + seed, 5, H, generator=g)
            with torch.no_grad():
                ref = hf_mlp(x)
                got = block(x)
                # Same routing as transformers' router (as sets of experts per token).
                _, hf_w, hf_i = hf_mlp.gate(x.reshape(-1, H))
                our_w, our_i = block.gate(x.reshape(-1, H))
            assert got.shape == x.shape and got.dtype == x.dtype
            err = R.rel_err(ref, got)
            assert err < TOL, f"{arch} layer {layer} seed {seed}: relative error {err:.2e}"
            hs, hw = torch.sort(hf_i, dim=-1)
            os_, ow = torch.sort(our_i, dim=-1)
            assert torch.equal(hs, os_)
            assert R.rel_err(hf_w.gather(1, hw), our_w.gather(1, ow)) < 1e-6
            if int(overrides.get("n_group", 1)) > 1:
                # Group limiting must matter for some tokens, or the test would not exercise it.
                plain = _ungrouped_choice(arch, x.reshape(-1, H), block.gate, spec.top_k)
                group_changed += int((plain != hs).any(-1).sum())
        if int(overrides.get("n_group", 1)) > 1:
            assert group_changed > 0, "group-limited routing never changed a choice: test too weak"


# ------------------------------------------------------------------ TuckerExperts alone


@pytest.fixture(scope="module")
def hf_experts_pair():
    """transformers' Qwen3-MoE experts module (E=8, H=32, I=16) and a TuckerExperts, both
    holding the same weights (random orthonormal factors and cores)."""
    import tiny_models

    model = tiny_models.make_model("qwen3_moe", seed=5)
    hf = model.model.layers[0].mlp.experts
    E, H, I = hf.num_experts, hf.hidden_dim, hf.intermediate_dim
    factors = R.random_factors(E, H, I, R.PLAN, seed=11)
    dense = R.dense_from_flat(factors)
    R.install_dense(hf, dense)
    ours = TuckerExperts(E, H, I, R.PLAN, parallel=ParallelContext())
    ours.load_factors(factors)
    return hf, ours, factors, dense


def _routing(T: int, K: int, experts: list[int], seed: int, dtype=torch.float32):
    """Distinct experts per token drawn from ``experts`` (others get no token), random weights."""
    g = torch.Generator().manual_seed(seed)
    pool = torch.tensor(experts)
    idx = torch.stack([pool[torch.randperm(len(experts), generator=g)[:K]] for _ in range(T)])
    w = torch.rand(T, K, generator=g).to(dtype) + 0.1
    return idx, w


@pytest.mark.parametrize(
    "T,experts",
    [(1, [3, 6]), (1, list(range(8))), (7, [0, 2, 5, 7]), (64, list(range(8))), (33, [1, 6])],
    ids=["T1-two-experts", "T1", "T7-half-idle", "T64", "T33-two-experts"],
)
def test_experts_match_transformers(hf_experts_pair, T, experts):
    hf, ours, _, dense = hf_experts_pair
    H = hf.hidden_dim
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(T))
    idx, w = _routing(T, 2, experts, seed=T)
    with torch.no_grad():
        ref = hf(x, idx, w)
        got = ours(x, idx, w)
    assert got.shape == (T, H) and got.dtype == torch.float32
    assert R.rel_err(ref, got) < TOL
    # And against a float64 loop that shares nothing with either implementation.
    assert R.rel_err(R.moe_reference(x, idx, w, dense), got) < TOL


def test_experts_unsorted_and_repeated_routing(hf_experts_pair):
    """top_k_index in any order per token; the same expert on many tokens."""
    hf, ours, _, dense = hf_experts_pair
    x = torch.randn(5, hf.hidden_dim, generator=torch.Generator().manual_seed(1))
    idx = torch.tensor([[7, 0], [0, 7], [4, 3], [3, 4], [7, 3]])
    w = torch.tensor([[0.9, 0.1], [0.3, 0.7], [0.5, 0.5], [1.0, 0.2], [0.25, 0.75]])
    with torch.no_grad():
        assert R.rel_err(hf(x, idx, w), ours(x, idx, w)) < TOL
        assert R.rel_err(R.moe_reference(x, idx, w, dense), ours(x, idx, w)) < TOL


def test_experts_bfloat16(hf_experts_pair):
    hf32, _, factors, dense = hf_experts_pair
    E, H, I = hf32.num_experts, hf32.hidden_dim, hf32.intermediate_dim
    ours = TuckerExperts(E, H, I, R.PLAN, parallel=ParallelContext(), dtype=torch.bfloat16)
    ours.load_factors(factors)
    for p in PROJECTIONS:
        for name in (*FACTORS, "G"):
            assert getattr(getattr(ours, p), name).dtype == torch.bfloat16, (p, name)
    import copy

    hf16 = copy.deepcopy(hf32).to(torch.bfloat16)
    for T in (1, 48):
        x = torch.randn(T, H, generator=torch.Generator().manual_seed(T))
        idx, w = _routing(T, 2, list(range(E)), seed=T)
        ref = R.moe_reference(x.bfloat16().float(), idx, w.bfloat16().float(), dense)
        with torch.no_grad():
            got = ours(x.bfloat16(), idx, w.bfloat16())
            hf_got = hf16(x.bfloat16(), idx, w.bfloat16())
        assert got.dtype == torch.bfloat16 and got.shape == (T, H)
        err = R.rel_err(ref, got.float())
        # bf16 has 8 mantissa bits (~0.4%); a few roundings in a row stay well below 3%.
        assert err < 3e-2, err
        assert R.rel_err(hf_got.float(), got.float()) < 3e-2


def test_experts_zero_tokens(hf_experts_pair):
    _, ours, _, _ = hf_experts_pair
    x = torch.zeros(0, ours.hidden_size)
    out = ours(x, torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 2))
    assert out.shape == (0, ours.hidden_size)


# ------------------------------------------------------------------ defect 1: the partial sums are reduced


def _single_and_inputs(E=8, H=32, I=16, T=19, K=3, seed=0, experts=None):
    factors = R.random_factors(E, H, I, R.PLAN, seed=seed)
    single = TuckerExperts(E, H, I, R.PLAN, parallel=ParallelContext())
    single.load_factors(factors)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(T, H, generator=g)
    idx, w = _routing(T, K, experts or list(range(E)), seed=seed + 2)
    return factors, single, x, idx, w


@pytest.mark.parametrize("layout", ["intermediate", "expert"])
@pytest.mark.parametrize("world", [2, 3, 4])
def test_partials_over_simulated_ranks_sum_to_single_device(layout, world):
    """E=8 and I=16 over 3 ranks are uneven splits; sum of partials, then finish."""
    E, H, I = 8, 32, 16
    factors, single, x, idx, w = _single_and_inputs(E, H, I)
    with torch.no_grad():
        ref = single(x, idx, w)
        parts = []
        local_sizes = []
        for r in range(world):
            m = TuckerExperts(E, H, I, R.PLAN, layout=layout, parallel=ParallelContext(rank=r, world=world))
            m.load_factors(factors)  # full factors: each rank slices its own part
            local_sizes.append(m.gate.U_E.shape[0] if layout == "expert" else m.gate.U_I.shape[0])
            for p in PROJECTIONS:
                f = getattr(m, p)
                if layout == "expert":
                    assert f.G.shape[0] == f.U_E.shape[0] and f.U_I.shape[0] == I
                else:
                    assert f.U_E.shape[0] == E and f.G.shape[0] == E
                assert f.U_H.shape[0] == H
            parts.append(m.partial(x, idx, w))
            last = m
        assert local_sizes == split_sizes(E if layout == "expert" else I, world)
        s = torch.stack(parts).sum(0)
        got = last.finish(s)
        # Without the reduction (the draft's defect) a single rank's share is wrong.
        alone = last.finish(parts[0])
    assert R.rel_err(ref, got) < TOL
    assert R.rel_err(ref, alone) > 0.05


def test_expert_layout_rank_without_tokens():
    """Routing that never reaches the last rank's experts: its partial is zero and the
    sum is still the single-device output."""
    E, H, I, world = 8, 32, 16, 3
    factors, single, x, idx, w = _single_and_inputs(E, H, I, experts=[0, 1, 2, 3, 4, 5], K=2)
    with torch.no_grad():
        ref = single(x, idx, w)
        parts = []
        for r in range(world):
            m = TuckerExperts(E, H, I, R.PLAN, layout="expert", parallel=ParallelContext(rank=r, world=world))
            m.load_factors(factors)
            parts.append(m.partial(x, idx, w))
        assert m.expert_range == (6, 8)
        assert float(parts[-1].abs().max()) == 0.0
        assert R.rel_err(ref, m.finish(sum(parts))) < TOL


class _Hub:
    """An in-process all-reduce between threads (one per simulated rank)."""

    def __init__(self, world: int):
        self.world = world
        self.barrier = threading.Barrier(world, timeout=60)
        self.slots: list[Any] = [None] * world
        self.calls = [0] * world
        self.sizes: list[list[int]] = [[] for _ in range(world)]
        self.gathers: list[list[int]] = [[] for _ in range(world)]

    def all_reduce(self, rank: int, tensor: torch.Tensor) -> None:
        self.calls[rank] += 1
        self.sizes[rank].append(tensor.shape[-1])
        self.slots[rank] = tensor.clone()
        self.barrier.wait()
        total = self.slots[0].clone()
        for t in self.slots[1:]:
            total += t
        self.barrier.wait()
        tensor.copy_(total)

    def all_gather(self, rank: int, tensor: torch.Tensor) -> list[torch.Tensor]:
        self.gathers[rank].append(tensor.shape[-1])
        self.slots[rank] = tensor.clone()
        self.barrier.wait()
        parts = [t.clone() for t in self.slots]
        self.barrier.wait()
        return parts


@dataclass(frozen=True)
class _HubContext(ParallelContext):
    hub: Any = None

    def all_reduce(self, tensor):
        if self.world > 1:
            self.hub.all_reduce(self.rank, tensor)
        return tensor

    def all_gather_cat(self, tensor, sizes, dim=-1):
        if self.world == 1:
            return tensor
        parts = self.hub.all_gather(self.rank, tensor)
        assert [p.shape[dim] for p in parts] == list(sizes)
        return torch.cat(parts, dim=dim)


def _run_ranks(world: int, fn) -> list[Any]:
    hub = _Hub(world)
    results: list[Any] = [None] * world
    errors: list[BaseException] = []

    def target(r):
        try:
            results[r] = fn(_HubContext(rank=r, world=world, hub=hub))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
            hub.barrier.abort()

    threads = [threading.Thread(target=target, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
        assert not t.is_alive(), "a simulated rank hung"
    if errors:
        raise errors[0]
    return [results, hub]


@pytest.mark.parametrize("layout", ["intermediate", "expert"])
def test_forward_reduces_across_ranks(layout):
    """forward() itself all-reduces once (r_H values per token) and every rank returns
    the single-device output."""
    E, H, I, world = 8, 32, 16, 3
    factors, single, x, idx, w = _single_and_inputs(E, H, I)
    ref = single(x, idx, w)

    def rank_fn(ctx):
        m = TuckerExperts(E, H, I, R.PLAN, layout=layout, parallel=ctx)
        m.load_factors(factors)
        with torch.no_grad():
            return m(x, idx, w)

    outs, hub = _run_ranks(world, rank_fn)
    for r, out in enumerate(outs):
        assert R.rel_err(ref, out) < TOL, r
    assert hub.calls == [1] * world
    assert hub.sizes == [[R.PLAN["down"][1]]] * world  # r_H of down, not H


@pytest.mark.parametrize("arch", ["qwen3_moe", "qwen2_moe", "deepseek_v3"])
@pytest.mark.parametrize("layout", ["intermediate", "expert"])
def test_block_one_all_reduce_per_forward(arch, layout, tucker_factory):
    """The whole block over 2 simulated ranks: one collective per forward, shared expert
    partial fused into it; result equals the single-device block."""
    _, tucker = tucker_factory(arch)
    spec = TensorSource.open(tucker, parallel=ParallelContext()).spec
    layer = spec.moe_layers[-1]
    ref_block = build_moe_block(TensorSource.open(tucker, parallel=ParallelContext()), layer)
    x = torch.randn(2, 6, spec.hidden_size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = ref_block(x)

    def rank_fn(ctx):
        block = build_moe_block(TensorSource.open(tucker, parallel=ctx, layout=layout), layer)
        with torch.no_grad():
            return block(x)

    world = 2
    outs, hub = _run_ranks(world, rank_fn)
    for out in outs:
        assert R.rel_err(ref, out) < TOL
    assert hub.calls == [1] * world
    shared = ref_block.shared_name is not None
    assert hub.sizes[0] == [R.PLAN["down"][1] + (spec.hidden_size if shared else 0)]


# ------------------------------------------------------------------ defect 2: per-expert cores formed once


def test_cores_are_materialized_from_factors(hf_experts_pair):
    _, ours, factors, _ = hf_experts_pair
    for p in PROJECTIONS:
        U_E, core = factors[f"{p}.U_E"].double(), factors[f"{p}.core"].double()
        ref = torch.stack([sum(U_E[e, a] * core[a] for a in range(core.shape[0])) for e in range(U_E.shape[0])])
        G = getattr(ours, p).G
        assert tuple(G.shape) == (U_E.shape[0], core.shape[1], core.shape[2])
        assert R.rel_err(ref, G) < 1e-6


def test_forward_never_forms_cores(hf_experts_pair, monkeypatch):
    _, ours, _, _ = hf_experts_pair
    calls = {"materialize": 0, "einsum": 0}
    orig_mat, orig_einsum = TuckerFactors.materialize, torch.einsum

    def counting_materialize(self):
        calls["materialize"] += 1
        return orig_mat(self)

    def counting_einsum(*a, **k):
        calls["einsum"] += 1
        return orig_einsum(*a, **k)

    monkeypatch.setattr(TuckerFactors, "materialize", counting_materialize)
    monkeypatch.setattr(torch, "einsum", counting_einsum)
    T = 512
    x = torch.randn(T, ours.hidden_size, generator=torch.Generator().manual_seed(0))
    idx, w = _routing(T, 2, list(range(ours.num_experts)), seed=0)
    G_before = {p: getattr(ours, p).G.clone() for p in PROJECTIONS}
    with torch.no_grad():
        ours(x, idx, w)
        ours(x[:1], idx[:1], w[:1])
    assert calls == {"materialize": 0, "einsum": 0}
    for p in PROJECTIONS:
        assert torch.equal(G_before[p], getattr(ours, p).G)
    # Loading does form them, once per projection.
    ours.materialize()
    assert calls["materialize"] == 3


def _grouped_mm_flops(a, b, offs=None, *args, out_val=None, **kwargs) -> int:
    """A grouped product (2-D rows x 3-D groups, torch's or ours): the rows up to the last
    offset meet one group's [k, n] matrix each; rows past it are not computed."""
    assert a.dim() == 2 and b.dim() == 3, (a.shape, b.shape)
    rows = int(offs[-1]) if offs is not None else a.shape[0]
    return 2 * rows * a.shape[1] * b.shape[2]


_grouped_mm_flops._get_raw = True  # FlopCounterMode passes the tensors, not their shapes


def _forward_flops(m, x, idx, w) -> int:
    mapping = {torch.ops.aten._grouped_mm: _grouped_mm_flops}
    if hasattr(torch.ops, "tuckerize") and hasattr(torch.ops.tuckerize, "grouped_mm"):
        mapping[torch.ops.tuckerize.grouped_mm] = _grouped_mm_flops
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=mapping) as fc:
        m(x, idx, w)
    return fc.get_total_flops()


@pytest.mark.parametrize("kernel", ["grouped", "gather"])
def test_forward_flops_follow_design_formula(kernel):
    E, H, I, K = 16, 64, 48, 4
    rE, rH, rI = 16, 32, 24
    ranks = {p: (rE, rH, rI) for p in PROJECTIONS}
    m = TuckerExperts(E, H, I, ranks, parallel=ParallelContext(), kernel=kernel)
    m.load_factors(R.random_factors(E, H, I, ranks, seed=2))
    assert m.kernel.name == kernel
    flops = {}
    for T in (64, 128):
        x = torch.randn(T, H, generator=torch.Generator().manual_seed(T))
        idx, w = _routing(T, K, list(range(E)), seed=T)
        flops[T] = _forward_flops(m, x, idx, w)
        design = 2 * (3 * H * rH * T + T * K * (3 * rH * rI + 3 * rI * I))
        draft_cores = 2 * T * K * rE * rH * rI  # the draft's per-pair U_E[e] x core alone
        assert abs(flops[T] - design) <= 0.05 * design, (T, flops[T], design)
        assert flops[T] < 0.6 * draft_cores, (T, flops[T], draft_cores)
    # Linear in T: no per-call work that forms all experts' cores (E r_E r_H r_I per projection).
    assert flops[128] == 2 * flops[64]


# ------------------------------------------------------------------ defect 3: semantic axes


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral"])
def test_factor_axes_in_checkpoint_and_module(arch, tucker_factory):
    src, tucker = tucker_factory(arch)
    ckpt = TuckerCheckpoint.open(tucker)
    E, H, I = ckpt.spec.shape
    assert H != I
    layer = ckpt.spec.moe_layers[0]
    source = {}
    for f in sorted(src.glob("*.safetensors")):
        source.update(load_file(str(f)))
    names = {"qwen3_moe": ("mlp", "gate_proj", "up_proj", "down_proj"),
             "mixtral": ("block_sparse_moe", "w1", "w3", "w2")}[arch]
    block_name, *proj_names = names
    for p, pname in zip(PROJECTIONS, proj_names):
        rE, rH, rI = R.PLAN[p]
        f = ckpt.factors(layer, p)
        assert tuple(f["U_E"].shape) == (E, rE), p
        assert tuple(f["U_H"].shape) == (H, rH), p
        assert tuple(f["U_I"].shape) == (I, rI), p
        assert tuple(f["core"].shape) == (rE, rH, rI), p
        # Semantic stacking, independent of tuckerize: W[e, h, i]; gate/up stored [I, H].
        per = [source[f"model.layers.{layer}.{block_name}.experts.{e}.{pname}.weight"] for e in range(E)]
        W = torch.stack([t if p == "down" else t.T for t in per]).double()
        assert tuple(W.shape) == (E, H, I)
        # Orthonormal factors, and the core is W projected on them (true for ST-HOSVD and HOOI).
        for name in ("U_E", "U_H", "U_I"):
            U = f[name].double()
            assert R.rel_err(torch.eye(U.shape[1], dtype=torch.float64), U.T @ U) < 1e-5
        core = torch.einsum("ehi,ea,hb,ic->abc", W, f["U_E"].double(), f["U_H"].double(), f["U_I"].double())
        assert R.rel_err(core, f["core"]) < 1e-4, p

    m = build_moe_block(TensorSource.open(tucker, parallel=ParallelContext()), layer).experts
    for p in PROJECTIONS:
        rE, rH, rI = R.PLAN[p]
        mod = getattr(m, p)
        assert tuple(mod.U_H.shape) == (H, rH) and tuple(mod.U_I.shape) == (I, rI), p
        assert tuple(mod.G.shape) == (E, rH, rI), p


# ------------------------------------------------------------------ defect 4: device, dtype, shapes, rank once


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_block_dtype_from_caller(dtype, tucker_factory):
    _, tucker = tucker_factory("qwen2_moe")
    source = TensorSource.open(tucker, parallel=ParallelContext())
    layer = source.spec.moe_layers[0]
    block = build_moe_block(source, layer, dtype=dtype, device="cpu")
    for p in PROJECTIONS:
        for name in (*FACTORS, "G"):
            t = getattr(getattr(block.experts, p), name)
            assert t.dtype == dtype and t.device.type == "cpu", (p, name, t.dtype)
    for name, t in [*block.named_parameters(), *block.named_buffers()]:
        if name.endswith("e_score_correction_bias") or not t.is_floating_point():  # integer index tables
            continue
        assert t.dtype == dtype, (name, t.dtype)
    ref_block = build_moe_block(source, layer)
    x = torch.randn(2, 4, source.spec.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = block(x.to(dtype))
        ref = ref_block(x)
    assert out.dtype == dtype and out.shape == x.shape
    assert torch.isfinite(out.float()).all()
    if dtype == torch.float64:
        assert R.rel_err(ref, out) < TOL


def test_module_device_from_caller():
    m = TuckerExperts(8, 32, 16, R.PLAN, parallel=ParallelContext(), device="meta", dtype=torch.float16)
    for p in PROJECTIONS:
        for name in (*FACTORS, "G"):
            t = getattr(getattr(m, p), name)
            assert t.device.type == "meta" and t.dtype == torch.float16


def test_shape_mismatch_on_load_raises():
    E, H, I = 8, 32, 16
    factors = R.random_factors(E, H, I, R.PLAN, seed=0)
    bad = dict(factors)
    rE, rH, rI = R.PLAN["up"]
    bad["up.U_H"] = R.random_factors(E, H, I, {"up": (rE, rH + 1, rI)}, seed=1)["up.U_H"]
    m = TuckerExperts(E, H, I, R.PLAN, parallel=ParallelContext())
    with pytest.raises(ShardError, match=r"up\.U_H"):
        m.load_factors(bad)
    # Semantic axes swapped (U_I given where U_H is expected) is a shape error too.
    swapped = dict(factors)
    swapped["down.U_H"], swapped["down.U_I"] = factors["down.U_I"], factors["down.U_H"]
    with pytest.raises(ShardError, match=r"down\.U_H"):
        TuckerExperts(E, H, I, R.PLAN, parallel=ParallelContext()).load_factors(swapped)
    missing = {k: v for k, v in factors.items() if k != "gate.core"}
    with pytest.raises(ShardError, match=r"gate\.core"):
        TuckerExperts(E, H, I, R.PLAN, parallel=ParallelContext()).load_factors(missing)
    # A shard of another tp size: an I slice that is neither whole nor this rank's.
    m2 = TuckerExperts(E, H, I, R.PLAN, parallel=ParallelContext(rank=0, world=2))
    wrong = dict(factors)
    for p in PROJECTIONS:
        wrong[f"{p}.U_I"] = factors[f"{p}.U_I"][:5]
    with pytest.raises(ShardError, match="U_I"):
        m2.load_factors(wrong)


def test_tensor_source_load_shape_mismatch(tucker_factory):
    _, tucker = tucker_factory("qwen3_moe")
    source = TensorSource.open(tucker, parallel=ParallelContext())
    dst = torch.zeros(3, 3)
    with pytest.raises(ShardError, match="shape"):
        source.load(dst, "model.layers.0.mlp.gate.weight")


def test_rank_and_world_taken_once(monkeypatch, hf_experts_pair):
    """After construction nothing asks torch.distributed for the rank or world size."""
    import torch.distributed as dist

    _, _, factors, dense = hf_experts_pair
    E, H, I = 8, 32, 16
    ctx = ParallelContext()
    m = TuckerExperts(E, H, I, R.PLAN, parallel=ctx)
    m.load_factors(factors)
    assert m.parallel is ctx

    def boom(*a, **k):
        raise AssertionError("torch.distributed queried after construction")

    for name in ("get_rank", "get_world_size", "is_initialized", "get_backend"):
        monkeypatch.setattr(dist, name, boom)
    x = torch.randn(6, H, generator=torch.Generator().manual_seed(0))
    idx, w = _routing(6, 2, list(range(E)), seed=0)
    with torch.no_grad():
        out = m(x, idx, w)
    assert R.rel_err(R.moe_reference(x, idx, w, dense), out) < TOL

    # And with a world of 2 (simulated ranks in threads): the stored context is used.
    def rank_fn(c):
        mm = TuckerExperts(E, H, I, R.PLAN, layout="expert", parallel=c)
        mm.load_factors(factors)
        with torch.no_grad():
            return mm(x, idx, w)

    outs, _ = _run_ranks(2, rank_fn)
    for o in outs:
        assert R.rel_err(R.moe_reference(x, idx, w, dense), o) < TOL


def test_default_context_without_process_group():
    import torch.distributed as dist

    assert not (dist.is_available() and dist.is_initialized())
    m = TuckerExperts(8, 32, 16, R.PLAN)
    assert (m.parallel.rank, m.parallel.world) == (0, 1)


def test_unknown_layout_rejected():
    with pytest.raises(ShardError, match="layout"):
        TuckerExperts(8, 32, 16, R.PLAN, layout="diagonal")


# ------------------------------------------------------------------ the hybrid layout (every term split by N)


@pytest.mark.parametrize("layout", ["hybrid", "hybrid-replicated-out"])
@pytest.mark.parametrize("world", [2, 3, 4])
def test_hybrid_forward_across_ranks(world, layout):
    """Hybrid over simulated ranks (3 is uneven for E, H and every r_H): every rank returns
    the single-device output; collectives: one all-gather of the projected input
    (r_H,gate + r_H,up), one all-reduce of s (r_H,down), one all-gather of the output (H;
    none in ``hybrid-replicated-out``, whose ranks hold all of U_H,down)."""
    E, H, I = 8, 32, 16
    factors, single, x, idx, w = _single_and_inputs(E, H, I)
    ref = single(x, idx, w)

    def rank_fn(ctx):
        m = TuckerExperts(E, H, I, R.PLAN, layout=layout, parallel=ctx)
        m.load_factors(factors)
        with torch.no_grad():
            return m(x, idx, w), m

    outs, hub = _run_ranks(world, rank_fn)
    for r, (out, _) in enumerate(outs):
        assert R.rel_err(ref, out) < TOL, r
    assert hub.sizes == [[R.PLAN["down"][1]]] * world
    rg, ru = split_sizes(R.PLAN["gate"][1], world), split_sizes(R.PLAN["up"][1], world)
    out_gather = [[split_sizes(H, world)[r]] if layout == "hybrid" else [] for r in range(world)]
    assert hub.gathers == [[rg[r] + ru[r], *out_gather[r]] for r in range(world)]
    # Every term is split: the ranks' pieces of each factor tile the whole exactly once.
    mods = [m for _, m in outs]
    for p in PROJECTIONS:
        if layout == "hybrid-replicated-out" and p == "down":
            assert mods[0].shard_spec("down.U_H") is None
        for f in ("U_E", "U_H") if layout == "hybrid" or p != "down" else ("U_E",):
            sp = [m.shard_spec(f"{p}.{f}") for m in mods]
            axis = sp[0].axis
            assert sum(s.stop - s.start for s in sp) == factors[f"{p}.{f}"].shape[axis]
            got = torch.cat([getattr(getattr(m, p), f) for m in mods], dim=axis)
            assert torch.equal(got, factors[f"{p}.{f}"]), (p, f)
        assert mods[0].shard_spec(f"{p}.core") is None and mods[0].shard_spec(f"{p}.U_I") is None


@pytest.mark.parametrize("kernel", ["grouped", "gather"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("world", [1, 2, 4])
def test_cost_per_token_counts_the_forward(layout, world, kernel):
    """cost_per_token (from the module's own shapes) against torch's flop counter on the
    forward of each simulated rank, with routing spread evenly over the experts. The grouped
    kernel stops at each rank's own pairs; the gather kernel computes every pair (and says so)."""
    E, H, I, K, T = 8, 32, 16, 2, 64
    factors = R.random_factors(E, H, I, R.PLAN, seed=4)
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(5))
    idx = torch.stack([(torch.arange(T) * K + k) % E for k in range(K)], dim=1)  # every expert T*K/E times
    w = torch.full((T, K), 1.0 / K)

    def rank_fn(ctx):
        m = TuckerExperts(E, H, I, R.PLAN, layout=layout, parallel=ctx, kernel=kernel)
        design = m.cost_per_token(K)  # before loading: the layout's own shapes, unpadded
        m.load_factors(factors)
        return _forward_flops(m, x, idx, w) / 2 / T, m.cost_per_token(K), design

    outs, _ = _run_ranks(world, rank_fn)
    for counted, cost, _ in outs:
        assert abs(counted - cost["macs"]) <= 1e-6 * cost["macs"], (counted, cost)
    if kernel == "gather":
        return
    outs = [(counted, design) for counted, _, design in outs]
    single = TuckerExperts(E, H, I, R.PLAN, parallel=ParallelContext()).cost_per_token(K)["macs"]
    if layout == "hybrid":  # the work is divided, not replicated
        assert sum(c["macs"] for _, c in outs) == pytest.approx(single)
    if layout == "hybrid-replicated-out":  # all but s U_H,down^T, done on every rank
        extra = H * R.PLAN["down"][1] * (world - 1)
        assert sum(c["macs"] for _, c in outs) == pytest.approx(single + extra)


@pytest.mark.parametrize("layout", EXPERT_SPLIT_LAYOUTS)
def test_experts_assigned_by_load_across_ranks(layout):
    """An explicit, non-contiguous assignment of experts to ranks (as a shard set records
    it): each rank holds exactly its experts' U_E rows and the result is unchanged."""
    E, H, I, world = 8, 32, 16, 3
    assignment = [[0, 5, 7], [2, 3], [1, 4, 6]]
    factors, single, x, idx, w = _single_and_inputs(E, H, I)
    ref = single(x, idx, w)

    def rank_fn(ctx):
        m = TuckerExperts(E, H, I, R.PLAN, layout=layout, parallel=ctx, experts=assignment[ctx.rank])
        m.load_factors(factors)
        for p in PROJECTIONS:
            assert torch.equal(getattr(m, p).U_E, factors[f"{p}.U_E"][assignment[ctx.rank]])
        with torch.no_grad():
            return m(x, idx, w)

    outs, _ = _run_ranks(world, rank_fn)
    for r, out in enumerate(outs):
        assert R.rel_err(ref, out) < TOL, r


# ------------------------------------------------------------------ memory held


@pytest.mark.parametrize("layout,world", [("intermediate", 1), ("intermediate", 2), ("expert", 2), ("hybrid", 4),
                                          ("hybrid-replicated-out", 3)])
def test_memory_bytes_from_shapes(layout, world):
    """The bytes a rank holds per layer, against the arithmetic of DESIGN.md's shapes:
    factors E_r r_E + H_r r_H + I_r r_I + r_E r_H r_I, cores E_r r_H r_I, per projection."""
    from tuckerize.parallel import split_range

    E, H, I = 8, 32, 16
    dtype = torch.bfloat16
    for rank in range(world):
        m = TuckerExperts(E, H, I, R.PLAN, layout=layout, parallel=ParallelContext(rank=rank, world=world),
                          dtype=dtype, device="meta")
        size = lambda n, split: (lambda a, b: b - a)(*split_range(n, world, rank)) if split else n  # noqa: E731
        e_r = size(E, layout in EXPERT_SPLIT_LAYOUTS)
        i_r = size(I, layout == "intermediate")
        factors = cores = 0
        for p in PROJECTIONS:
            rE, rH, rI = R.PLAN[p]
            u_h = size(H, layout == "hybrid") * rH if p == "down" else H * size(rH, layout.startswith("hybrid"))
            factors += e_r * rE + u_h + i_r * rI + rE * rH * rI
            cores += e_r * rH * rI
        got = m.memory_bytes()
        assert got == {"factors": 2 * factors, "cores": 2 * cores, "kernel": 0, "total": 2 * (factors + cores)}
    mem = te.memory_per_layer([m, m, torch.nn.Linear(2, 2)])
    assert mem["layers"] == 2 and mem["total"] == got["total"]
    assert mem["dense_same_dtype"] == 3 * E * H * I * 2 / world
    assert te.memory_per_layer([torch.nn.Linear(2, 2)]) is None

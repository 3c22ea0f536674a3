"""The whole causal LM against transformers, and tensor parallelism against one process.

References never go through the runtime under test: transformers' own model of the same
checkpoint (for a Tucker checkpoint: with the routed experts' dense weights replaced by
the float64 reconstruction from the factors). The tiny checkpoints have 4 query heads
over 2 key/value heads and random unit-scale weights everywhere, routers included
(``model_refs.build_random``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import dist_helpers
import model_refs as M
import tucker_refs as R
from tuckerize.parallel import LAYOUTS, ParallelContext
from tuckerize.runtime.loader import TensorSource
from tuckerize.runtime.model import CausalLM
from tuckerize.shard import shard_checkpoint

TOL = 1e-4

#: Natively supported architectures, with overrides that exercise their particulars:
#: Qwen3-MoE with a dense MLP layer between MoE layers (mlp_only_layers), Qwen2-MoE (qkv
#: bias, gated shared expert), Mixtral (rope_theta 1e6 by default), OLMoE (q/k norm over
#: the whole projection, clip_qkv that clips some values).
NATIVE = {
    "qwen3_moe": dict(num_hidden_layers=3, mlp_only_layers=[1]),
    "qwen2_moe": dict(moe_intermediate_size=18),
    "mixtral": {},
    "olmoe": dict(clip_qkv=2.0),
}
#: DeepSeek-V3's MLA has one key/value per query head (transformers' attention needs it).
HF_ONLY = {"deepseek_v3": dict(num_key_value_heads=4), "qwen3_next": {}}


@pytest.fixture(scope="session")
def random_models(tmp_path_factory):
    """``get(arch) -> (original folder, Tucker folder)``, built once per session."""
    root = tmp_path_factory.mktemp("random_models")
    cache: dict[str, tuple[Path, Path]] = {}

    def get(arch: str) -> tuple[Path, Path]:
        if arch not in cache:
            overrides = {**NATIVE, **HF_ONLY}[arch]
            src = M.build_random(arch, root / arch, seed=7, **overrides)
            cache[arch] = (src, R.decompose_tiny(src, root / f"{arch}-tucker"))
        return cache[arch]

    return get


def _ids(vocab: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(seed))


def _native_logits(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    source = TensorSource.open(folder, parallel=ParallelContext())
    model = CausalLM(source, dense_experts=not source.is_tucker, dtype=torch.float32).eval()
    return model(ids)


@pytest.mark.parametrize("arch", list(NATIVE))
def test_native_logits_equal_transformers(arch, random_models):
    src, tucker = random_models(arch)
    if arch == "qwen3_moe":
        assert M.moe_layers(src) == (0, 2)  # layer 1 is a dense MLP
    ids = _ids()
    ref_dense = M.hf_logits(src, ids)
    ref_tucker = M.hf_logits(src, ids, tucker=tucker)
    # The references must be far apart, or the test could not tell the experts apart.
    assert R.rel_err(ref_dense, ref_tucker) > 1e-2
    assert float(ref_dense.std()) > 0.3  # logits not degenerate
    got = _native_logits(src, ids)
    assert got.shape == ref_dense.shape and got.dtype == torch.float32
    err = R.rel_err(ref_dense, got)
    assert err < TOL, f"{arch} original: relative error {err:.2e}"
    got = _native_logits(tucker, ids)
    err = R.rel_err(ref_tucker, got)
    assert err < TOL, f"{arch} Tucker: relative error {err:.2e}"


def test_mixtral_sliding_window_is_enforced(tmp_path):
    from tuckerize.errors import UnsupportedArchitectureError

    src = M.build_random("mixtral", tmp_path / "m", seed=1, sliding_window=8)
    ids = _ids()[:, :8]
    got = _native_logits(src, ids)
    assert R.rel_err(M.hf_logits(src, ids), got) < TOL
    with pytest.raises(UnsupportedArchitectureError, match="sliding window"):
        _native_logits(src, _ids())


@pytest.mark.parametrize("arch", list(HF_ONLY))
def test_transformers_path_equals_reconstructed_dense(arch, random_models):
    from tuckerize.runtime.hf import load_hf_model
    from tuckerize.runtime.model import native_supported
    from tuckerize.runtime.tucker_experts import TuckerExperts

    assert not native_supported(arch)
    src, tucker = random_models(arch)
    ids = _ids()
    ref = M.hf_logits(src, ids, tucker=tucker)
    assert R.rel_err(M.hf_logits(src, ids), ref) > 1e-2
    import transformers

    def no_dense_load(*a, **k):
        raise AssertionError("from_pretrained would allocate the dense experts")

    with pytest.MonkeyPatch.context() as mp:  # built on the meta device, the tensors assigned
        mp.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_dense_load)
        model = load_hf_model(tucker, dtype=torch.float32)
    assert not any(t.device.type == "meta" for t in [*model.parameters(), *model.buffers()])
    layers = M.moe_layers(src)
    assert all(isinstance(model.model.layers[i].mlp.experts, TuckerExperts) for i in layers)
    with torch.no_grad():
        got = model(ids).logits
    err = R.rel_err(ref, got)
    assert err < TOL, f"{arch}: relative error {err:.2e}"


# ------------------------------------------------------------------ tensor parallel, real gloo groups

#: Architectures run in the process groups: q/k norm per head (Qwen3), qkv bias and a
#: shared expert split unevenly (Qwen2-MoE, I = 18 over 4), q/k norm over the sharded
#: projection (OLMoE; with tp=4 its 2 kv heads are replicated).
TP_ARCHS = ("qwen3_moe", "qwen2_moe", "olmoe")


@pytest.fixture(scope="module")
def tp_runs(random_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("tp_model")
    ids = _ids(seed=3)
    np.save(root / "ids.npy", ids.numpy())
    refs = {}
    for arch in TP_ARCHS:
        src, tucker = random_models(arch)
        refs[(arch, "dense")] = _native_logits(src, ids)
        refs[(arch, "tucker")] = _native_logits(tucker, ids)
    runs: dict[int, tuple[Path, dict, list[dict]]] = {}

    def get(tp: int) -> tuple[Path, dict, list[dict]]:
        if tp in runs:
            return runs[tp]
        out = root / f"tp{tp}"
        jobs = []
        for arch in TP_ARCHS:
            src, tucker = random_models(arch)
            jobs.append({"name": f"{arch}-dense", "ref": (arch, "dense"), "folder": str(src)})
            jobs.append({"name": f"{arch}-tucker-sliced", "ref": (arch, "tucker"), "folder": str(tucker)})
            for layout in LAYOUTS if arch == "qwen2_moe" else ("intermediate",):
                shards = shard_checkpoint(tucker, tp, layout=layout, out=root / f"{arch}-tp{tp}-{layout}")["out"]
                jobs.append({"name": f"{arch}-tucker-{layout}", "ref": (arch, "tucker"), "folder": str(shards)})
        for job in jobs:
            job["input"] = str(root / "ids.npy")
        out.mkdir()
        (out / "jobs.json").write_text(json.dumps([{k: v for k, v in j.items() if k != "ref"} for j in jobs]))
        dist_helpers.run_workers(M.causal_lm_worker, tp, args=(str(out / "jobs.json"), str(out)), timeout=240)
        runs[tp] = (out, refs, jobs)
        return runs[tp]

    return get


@pytest.mark.parametrize("tp", [2, 4])
def test_tensor_parallel_logits_equal_single_process(tp, tp_runs):
    out, refs, jobs = tp_runs(tp)
    bad = []
    for job in jobs:
        ref = refs[job["ref"]]
        for rank in range(tp):
            got = torch.from_numpy(np.load(out / f"{job['name']}-r{rank}.npy"))
            err = R.rel_err(ref, got)
            if not err < 1e-5:
                bad.append(f"{job['name']} rank {rank}/{tp}: {err:.2e}")
    assert not bad, "logits differ from one process: " + "; ".join(bad)
    assert len(jobs) == 3 * len(TP_ARCHS) + len(LAYOUTS) - 1

"""tuckerize.calibration.collect (and the layer runner): statistics against float64 hooks on
transformers' own models, rank-deficient statistics, sequential calibration."""

from __future__ import annotations

import math

import pytest
import torch
from calibration_common import DEMO, POOLED, UNIFORM, rel
from moe_errors import moe_output_errors
from safetensors.torch import load_file

from tuckerize.calibration.collect import collect_statistics
from tuckerize.calibration.store import CalibrationSettings, CalibrationStats
from tuckerize.calibration.tokens import calibration_tokens
from tuckerize.compress import decompose_checkpoint
from tuckerize.decompose import tucker
from tuckerize.decompose.whiten import whiten, whitening
from tuckerize.text import read_text


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral", "deepseek_v3", "qwen3_next"])
def test_statistics_equal_float64_hooks_on_transformers(tiny_factory, arch):
    """Native runtime (qwen3_moe, mixtral) and transformers' own decoder layers run one at a
    time (deepseek_v3: MLA, qwen3_next: gated delta-net + full attention) against hooks on
    the whole transformers model."""
    from transformers import AutoModelForCausalLM

    # DeepSeek's MLA runs only with as many kv heads as heads in transformers (as in the real models)
    folder = tiny_factory(arch, **({"num_key_value_heads": 4} if arch == "deepseek_v3" else {}))
    tokens = torch.randint(0, 64, (3, 10), generator=torch.Generator().manual_seed(1))
    stats = collect_statistics(folder, CalibrationSettings("t", 3, 10, "-", per_expert=True), tokens)

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    ref: dict[int, dict[str, torch.Tensor]] = {}

    def hook(layer):
        def fn(module, args):
            x, idx, w = args[0].double(), args[1], args[2].double()
            E, twoI, H = module.gate_up_proj.shape
            d = ref.setdefault(layer, {"hidden": torch.zeros(H, H, dtype=torch.float64),
                                       "hidden_routed": torch.zeros(H, H, dtype=torch.float64),
                                       "inter": torch.zeros(twoI // 2, twoI // 2, dtype=torch.float64),
                                       "inter_routed": torch.zeros(twoI // 2, twoI // 2, dtype=torch.float64),
                                       "expert_mass": torch.zeros(E, dtype=torch.float64),
                                       "hidden_expert": torch.zeros(E, H, H, dtype=torch.float64),
                                       **{k: torch.zeros(E, twoI // 2, twoI // 2, dtype=torch.float64)
                                          for k in ("inter_expert", "up_expert", "gate_expert")}})
            d["hidden"] += x.T @ x
            d["hidden_routed"] += (x * w.pow(2).sum(-1, keepdim=True)).T @ x
            for t in range(x.shape[0]):
                for k in range(idx.shape[1]):
                    e = int(idx[t, k])
                    g, u = (module.gate_up_proj[e].double() @ x[t]).chunk(2)
                    a = torch.nn.functional.silu(g) * u
                    d["inter"] += torch.outer(a, a)
                    d["inter_routed"] += w[t, k] ** 2 * torch.outer(a, a)
                    d["expert_mass"][e] += w[t, k] ** 2
                    d["hidden_expert"][e] += w[t, k] ** 2 * torch.outer(x[t], x[t])
                    d["inter_expert"][e] += w[t, k] ** 2 * torch.outer(a, a)
                    sig = torch.sigmoid(g)
                    s = g * sig  # silu, and its derivative by hand
                    q = u * sig * (1 + g * (1 - sig))
                    d["up_expert"][e] += w[t, k] ** 2 * torch.outer(s, s)
                    d["gate_expert"][e] += w[t, k] ** 2 * torch.outer(q, q)
        return fn

    for name, module in model.named_modules():
        if type(module).__name__.endswith("Experts"):
            module.register_forward_pre_hook(hook(int(name.split(".layers.")[1].split(".")[0])))
    with torch.no_grad():
        model(tokens)
    assert set(ref) == set(stats.layers)
    for layer, d in ref.items():
        for key, value in d.items():
            assert rel(stats.layers[layer][key], value) < 1e-5, (layer, key)
        assert float(stats.layers[layer]["tokens"]) == tokens.numel()


@pytest.mark.parametrize("arch", ["deepseek_v3", "qwen3_next"])
def test_calibration_through_transformers_layers(tiny_factory, tmp_path, arch):
    """Architectures without a native runtime calibrate through transformers' own decoder
    layers, one at a time; the per-expert weighting then beats plain Tucker on every MoE
    layer's calibration output error."""
    import model_refs

    folder = tiny_factory(arch, **({"num_key_value_heads": 4} if arch == "deepseek_v3" else {}))
    text = tmp_path / "cal.txt"
    text.write_text(model_refs.text_for_tiny(4000))
    ranks = (4, 20, 8)  # tiny (E >= 4, H = 32, I = 16)
    white = decompose_checkpoint(str(folder), tmp_path / "w", ranks=ranks, calibration=str(text), samples=8, seqlen=48)
    decompose_checkpoint(str(folder), tmp_path / "p", ranks=ranks)
    assert white["settings"]["algorithm"].endswith("+expert-als")
    tokens = calibration_tokens(text.read_text(), folder, 8, 48)
    plain, weighted = moe_output_errors(folder, [tmp_path / "p", tmp_path / "w"], tokens)
    assert set(plain) == set(weighted) and plain
    for layer in plain:
        assert weighted[layer] < plain[layer], (layer, plain[layer], weighted[layer])


def test_rank_deficient_statistics_never_fail(tmp_path):
    # zero, rank-one and NaN-free tiny covariances
    for cov in (torch.zeros(8, 8), torch.ones(8, 8), torch.diag(torch.tensor([1e30] + [0.0] * 7))):
        w = whitening(cov.double())
        assert torch.isfinite(w.S).all() and torch.isfinite(w.S_inv).all()
        assert torch.allclose(w.S @ w.S_inv, torch.eye(8, dtype=torch.float64), atol=1e-6)
    # one sample of 4 tokens: every covariance has rank <= 4 (hidden size 128)
    m = decompose_checkpoint(str(DEMO), tmp_path / "o", ranks=UNIFORM, calibration="demo", samples=1, seqlen=4)
    stats = CalibrationStats.load(tmp_path / "o")
    assert float(stats.layers[0]["tokens"]) == 4
    assert int(torch.linalg.matrix_rank(stats.layers[0]["hidden"])) <= 4
    for t in m["tensors"]:
        assert math.isfinite(t["relative_error"]) and t["relative_error"] < 1
    for name, v in load_file(str(tmp_path / "o" / "model-00001-of-00005.safetensors")).items():
        assert torch.isfinite(v).all(), name


def test_sequential_calibration(tmp_path):
    m = decompose_checkpoint(str(DEMO), tmp_path / "s", ranks=UNIFORM, calibration="demo", samples=4, seqlen=32,
                             sequential=True)
    assert m["calibration"]["sequential"] is True and m["fingerprint"]["calibration"]["sequential"] is True
    dense = decompose_checkpoint(str(DEMO), tmp_path / "d", ranks=UNIFORM, calibration="demo", samples=4, seqlen=32)
    # layer 0 sees the same (uncompressed) inputs either way; later layers differ
    s0 = {t["projection"]: t for t in m["tensors"] if t["layer"] == 0}
    d0 = {t["projection"]: t for t in dense["tensors"] if t["layer"] == 0}
    assert s0["gate"]["relative_error"] == pytest.approx(d0["gate"]["relative_error"], rel=1e-5)
    s3 = next(t for t in m["tensors"] if t["layer"] == 3 and t["projection"] == "gate")
    d3 = next(t for t in dense["tensors"] if t["layer"] == 3 and t["projection"] == "gate")
    assert s3["relative_error"] != pytest.approx(d3["relative_error"], rel=1e-6)


def test_sequential_resume_after_crash_equals_uninterrupted_run(tmp_path, monkeypatch):
    """A resumed sequential run advances its calibration stream through the finished layers
    with their written factors, so it ends with the same checkpoint as an uninterrupted run."""
    import tuckerize.decompose.whiten as whiten_mod

    kw = dict(ranks=UNIFORM, calibration="demo", samples=2, seqlen=32, sequential=True, refit=True, whiten_options=POOLED)
    ref = decompose_checkpoint(str(DEMO), tmp_path / "ref", **kw)
    real, calls = whiten_mod.tucker, []

    def crashing(*a, **k):
        calls.append(1)
        if len(calls) == 7:  # layers 0 and 1 done, layer 2 crashes
            raise RuntimeError("simulated crash")
        return real(*a, **k)

    monkeypatch.setattr(whiten_mod, "tucker", crashing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        decompose_checkpoint(str(DEMO), tmp_path / "o", **kw)
    monkeypatch.setattr(whiten_mod, "tucker", real)
    again = decompose_checkpoint(str(DEMO), tmp_path / "o", **kw)
    assert [t["ranks"] for t in again["tensors"]] == [t["ranks"] for t in ref["tensors"]]
    for unit in ("model-00003-of-00005.safetensors", "model-00004-of-00005.safetensors"):
        a, b = load_file(str(tmp_path / "o" / unit)), load_file(str(tmp_path / "ref" / unit))
        assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a), unit

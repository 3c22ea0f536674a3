"""Calibration-aware Tucker: statistics, whitening, fold-back, allocation, CLI errors.

References are computed here independently of the library where it matters: the
calibration statistics from forward hooks on transformers' own model in float64, the
whitening square root from this file's own eigendecomposition, dense weights from the
written factors with one float64 einsum (tucker_refs.dense_from_factors).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
import tucker_refs
from cli_helpers import assert_cli_error
from safetensors.torch import load_file

from tuckerize.allocate import allocate, expert_budget, tucker_params, uniform_ranks
from tuckerize.calibrate import (
    CalibrationSettings,
    CalibrationStats,
    WhitenOptions,
    calibration_tokens,
    collect_statistics,
    moe_output_errors,
    read_calibration_text,
)
from tuckerize.compress import decompose_checkpoint
from tuckerize.decompose import tucker
from tuckerize.decompose.whiten import whiten, whitened_tucker, whitening
from tuckerize.demo import demo_path
from tuckerize.errors import CalibrationError, OutputConflictError, RankError
from tuckerize.format import TuckerCheckpoint
from tuckerize.ranks import load_plan

DEMO = demo_path()
SAMPLES, SEQLEN = 8, 64
UNIFORM = (16, 100, 50)  # demo (E, H, I) = (16, 128, 64); about 75% of the expert parameters
POOLED = WhitenOptions(method="pooled")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.norm(a.double() - b.double()) / torch.linalg.norm(b.double()))


# ------------------------------------------------------------------------ demo model runs (shared)


@pytest.fixture(scope="module")
def demo_runs(tmp_path_factory):
    """Plain and whitened Tucker of the demo model at the same uniform ranks, plus the tokens."""
    root = tmp_path_factory.mktemp("cal")
    white = root / "white"
    m_white = decompose_checkpoint(str(DEMO), white, ranks=UNIFORM, calibration="demo", samples=SAMPLES, seqlen=SEQLEN)
    plain = root / "plain"
    m_plain = decompose_checkpoint(str(DEMO), plain, ranks=UNIFORM)
    pooled = root / "pooled"
    m_pooled = decompose_checkpoint(str(DEMO), pooled, ranks=UNIFORM, stats=white, whiten_options=POOLED)
    text, _ = read_calibration_text("demo")
    tokens = calibration_tokens(text, DEMO, SAMPLES, SEQLEN)
    return {"root": root, "white": white, "plain": plain, "pooled": pooled, "m_white": m_white, "m_plain": m_plain,
            "m_pooled": m_pooled, "tokens": tokens}


def test_whitening_reduces_output_error_of_every_moe_layer(demo_runs):
    """Both weightings beat plain Tucker on every layer's calibration output error, and the
    per-expert one (the default) beats the pooled one."""
    plain, pooled, white = moe_output_errors(DEMO, [demo_runs["plain"], demo_runs["pooled"], demo_runs["white"]],
                                             demo_runs["tokens"])
    assert set(plain) == set(white) == set(pooled) == {0, 1, 2, 3}
    for layer in plain:
        assert pooled[layer] < 0.97 * plain[layer], (layer, plain[layer], pooled[layer])
        assert white[layer] < 0.97 * pooled[layer], (layer, pooled[layer], white[layer])
    # and the weight-space error is larger: whitening trades weight error for output error
    for run in ("m_pooled", "m_white"):
        for tp, tw in zip(demo_runs["m_plain"]["tensors"], demo_runs[run]["tensors"]):
            assert tw["relative_error"] >= tp["relative_error"] - 1e-6
            assert tw["whitened_error"] < tw["relative_error"]


def test_per_expert_core_refit_reduces_output_error_further(demo_runs, tmp_path):
    from tuckerize.arch import moe_spec
    from tuckerize.checkpoint import Checkpoint, load_config
    from tuckerize.experts import stack_projection

    out = tmp_path / "refit"
    m = decompose_checkpoint(str(DEMO), out, ranks=UNIFORM, calibration="demo", samples=SAMPLES, seqlen=SEQLEN,
                             stats=demo_runs["white"], refit=True, whiten_options=POOLED)
    assert m["calibration"]["refit"] is True and all(t["refit"] for t in m["tensors"])
    white, refit = moe_output_errors(DEMO, [demo_runs["pooled"], out], demo_runs["tokens"])
    for layer in white:
        assert refit[layer] < white[layer], (layer, white[layer], refit[layer])
    # same shared factors, other cores; the reported error is that of the written factors
    a, b = TuckerCheckpoint.open(demo_runs["pooled"]), TuckerCheckpoint.open(out)
    fa, fb = a.factors(2, "down"), b.factors(2, "down")
    assert torch.equal(fa["U_H"], fb["U_H"]) and torch.equal(fa["U_I"], fb["U_I"])
    assert not torch.equal(fa["core"], fb["core"])
    W = stack_projection(Checkpoint.open(DEMO), moe_spec(load_config(DEMO)), 2, "down")
    entry = next(x for x in m["tensors"] if x["layer"] == 2 and x["projection"] == "down")
    assert entry["relative_error"] == pytest.approx(rel(tucker_refs.dense_from_factors(*fb.values()), W), rel=1e-4)


def test_manifest_records_calibration(demo_runs):
    m = demo_runs["m_white"]
    cal = m["calibration"]
    assert cal["settings"]["samples"] == SAMPLES and cal["settings"]["seqlen"] == SEQLEN
    assert cal["settings"]["source"] == "demo" and len(cal["settings"]["text_sha256"]) == 64
    assert cal["whitening"] == WhitenOptions().to_dict() and cal["sequential"] is False
    assert m["settings"]["algorithm"].startswith("whitened-")
    assert m["fingerprint"]["calibration"]["settings"]["samples"] == SAMPLES
    assert (demo_runs["white"] / "calibration_stats.safetensors").is_file()
    assert "calibration" not in demo_runs["m_plain"] and "calibration" not in demo_runs["m_plain"]["fingerprint"]


def test_fold_back_of_written_factors(demo_runs):
    """W from the saved (orthonormal) factors == S^{-1}-unwhitened Tucker of the whitened tensor."""
    from tuckerize.arch import moe_spec
    from tuckerize.checkpoint import Checkpoint, load_config
    from tuckerize.experts import stack_projection

    stats = CalibrationStats.load(demo_runs["white"])
    ckpt = TuckerCheckpoint.open(demo_runs["pooled"])
    src = Checkpoint.open(DEMO)
    spec = moe_spec(load_config(DEMO))
    damp = POOLED.damp
    for layer, proj in ((0, "gate"), (3, "down")):
        cov = stats.layers[layer]["hidden_routed" if proj != "down" else "inter_routed"]
        vals, vecs = torch.linalg.eigh(cov)
        vals = vals.clamp_min(0) + damp * vals.clamp_min(0).mean()
        S, S_inv = (vecs * vals.sqrt()) @ vecs.T, (vecs / vals.sqrt()) @ vecs.T
        mode = 1 if proj != "down" else 2
        W = stack_projection(src, spec, layer, proj)
        Wp = torch.movedim(torch.movedim(W.double(), mode, -1) @ S, -1, mode).float()  # W x_mode S
        t = tucker(Wp, UNIFORM)
        factors = [f.double() for f in t.factors]
        factors[mode] = S_inv @ factors[mode]
        expected = tucker_refs.dense_from_factors(*factors, t.core)
        f = ckpt.factors(layer, proj)
        got = tucker_refs.dense_from_factors(f["U_E"], f["U_H"], f["U_I"], f["core"])
        assert rel(got, expected) < 1e-3  # float32 whitening in the library, float64 here
        for name in ("U_E", "U_H", "U_I"):
            u = f[name].double()
            assert torch.allclose(u.T @ u, torch.eye(u.shape[1], dtype=torch.float64), atol=1e-5), name
        entry = next(x for x in demo_runs["m_pooled"]["tensors"] if x["layer"] == layer and x["projection"] == proj)
        assert entry["relative_error"] == pytest.approx(rel(got, W), rel=1e-4)


def test_whitened_tucker_properties():
    g = torch.Generator().manual_seed(0)
    E, H, I = 6, 20, 12
    x = torch.randn(E, H, I, generator=g)
    a = torch.randn(H, H, generator=g) * torch.logspace(0, -3, H)  # anisotropic inputs
    cov = (a @ a.T).double()
    w = [None, whitening(cov, 1e-6), None]
    rank = (6, 8, 12)
    res = whitened_tucker(x, rank, w)
    # orthonormal factors, reconstruction in the original space
    for f in res.factors:
        assert torch.allclose(f.T.double() @ f.double(), torch.eye(f.shape[1], dtype=torch.float64), atol=1e-5)
    dense = res.to_tensor()
    assert res.relative_error == pytest.approx(rel(dense, x), rel=1e-4)
    # the whitened error is the output error ||S dW|| / ||S W||, and beats plain Tucker's
    xs, ds = whiten(x.double(), [None, w[1], None]), whiten(dense.double(), [None, w[1], None])
    assert res.whitened_error == pytest.approx(rel(ds, xs), rel=1e-3)
    plain = tucker(x, rank).to_tensor()
    assert rel(whiten(plain.double(), [None, w[1], None]), xs) > 1.5 * res.whitened_error
    # identity weights are plain Tucker
    eye = whitening(torch.eye(H, dtype=torch.float64), 0.0)
    same = whitened_tucker(x, rank, [None, eye, None])
    assert rel(same.to_tensor(), plain) < 1e-4


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


# ------------------------------------------------------------------------ statistics vs transformers


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


def test_streamed_statistics_file_equals_in_memory(tiny_factory, tmp_path):
    folder = tiny_factory("qwen3_moe")
    tokens = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(2))
    settings = CalibrationSettings("t", 2, 12, "-")
    mem = collect_statistics(folder, settings, tokens)
    disk = collect_statistics(folder, settings, tokens, out=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calibration_stats.json", "calibration_stats.safetensors"]
    again = CalibrationStats.load(tmp_path)
    assert again.settings == settings and sorted(again.layers) == sorted(mem.layers) == [0, 1]
    for L in mem.layers:
        for k, v in mem.layers[L].items():
            # per-expert fields are stored in float32 (E times larger than the rest), the rest in float64
            want = v.float() if k.endswith("_expert") else v
            assert torch.equal(disk.layers[L][k], want) and torch.equal(again.layers[L][k], want), (L, k)
    mem.save(tmp_path / "copy")
    assert torch.equal(CalibrationStats.load(tmp_path / "copy").layers[1]["inter_routed"], mem.layers[1]["inter_routed"])


# ------------------------------------------------------------------------ allocation


def test_allocate_meets_budget_on_synthetic_spectra():
    g = torch.Generator().manual_seed(0)
    shape = (8, 64, 32)
    spectra = {(L, p): [torch.rand(d, generator=g).sort(descending=True).values ** (L + 2) for d in shape]
               for L in range(3) for p in ("gate", "up", "down")}
    for ratio in (0.1, 0.3, 0.5, 0.75, 0.9):
        budget = expert_budget(shape, 9, ratio=ratio)
        for mode in ("full", "auto"):
            ranks = allocate(spectra, shape, budget, expert_rank=mode)
            used = sum(tucker_params(shape, r) for r in ranks.values())
            assert 0.99 * budget <= used <= budget, (ratio, mode, used, budget)
            if mode == "full":
                assert all(r[0] == 8 for r in ranks.values())
    u = uniform_ranks(shape, 9, budget)
    assert 0.99 * budget <= 9 * tucker_params(shape, u) <= budget
    with pytest.raises(RankError, match="below the smallest"):
        allocate(spectra, shape, 100)


def test_allocated_plan_meets_budget_and_round_trips_through_config(demo_runs, tmp_path):
    stats = demo_runs["white"]
    plan_file = tmp_path / "plan.yaml"
    m = decompose_checkpoint(str(DEMO), tmp_path / "alloc", ratio=0.6, stats=stats, save_config=plan_file)
    budget = round(0.6 * m["params"]["experts_before"])
    assert 0.99 * budget <= m["params"]["experts_after"] <= budget
    assert m["allocation"]["config"] == str(plan_file) and (tmp_path / "alloc" / "rank_plan.yaml").is_file()
    plan = load_plan(plan_file)
    for t in m["tensors"]:
        assert list(plan.ranks_for(t["layer"], t["projection"])) == t["ranks"]
    assert len({tuple(t["ranks"]) for t in m["tensors"]}) > 1  # not uniform
    again = decompose_checkpoint(str(DEMO), tmp_path / "again", config=plan_file, stats=stats)
    assert [t["ranks"] for t in again["tensors"]] == [t["ranks"] for t in m["tensors"]]
    a = load_file(str(tmp_path / "alloc" / "model-00002-of-00005.safetensors"))
    b = load_file(str(tmp_path / "again" / "model-00002-of-00005.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    plain = decompose_checkpoint(str(DEMO), tmp_path / "plain", ratio=0.6, save_config=tmp_path / "plain.yaml")
    assert 0.99 * budget <= plain["params"]["experts_after"] <= budget and "calibration" not in plain
    assert plain["allocation"]["spectra"] == "plain" and (tmp_path / "plain" / "rank_plan.yaml").is_file()
    by_params = decompose_checkpoint(str(DEMO), tmp_path / "p", params=500_000, stats=stats,
                                     save_config=tmp_path / "p.yaml")
    assert 495_000 <= by_params["params"]["experts_after"] <= 500_000


def test_default_config_path_under_configs(demo_runs, tmp_path, monkeypatch):
    """The CLI keeps an allocated plan under configs/ of the working directory; the library
    only returns it (manifest and out/rank_plan.yaml) unless asked where to save it."""
    monkeypatch.chdir(tmp_path)
    r = cli("--ratio", "0.9", "--stats", str(demo_runs["white"]), "--out", str(tmp_path / "o"), "--json")
    assert r.exit_code == 0, r.output
    m = json.loads(r.stdout)
    assert m["allocation"]["config"] == "configs/demo-keep0.9.yaml"
    plan = load_plan(tmp_path / "configs" / "demo-keep0.9.yaml")
    assert [list(plan.ranks_for(t["layer"], t["projection"])) for t in m["tensors"]] == [t["ranks"] for t in m["tensors"]]
    assert (tmp_path / "configs" / "demo-keep0.9.yaml").read_text() == (tmp_path / "o" / "rank_plan.yaml").read_text()
    lib = decompose_checkpoint(str(DEMO), tmp_path / "lib", ratio=0.9, stats=demo_runs["white"])
    assert lib["allocation"]["config"] is None and lib["rank_plan"] == m["rank_plan"]
    assert sorted(p.name for p in (tmp_path / "configs").iterdir()) == ["demo-keep0.9.yaml"]


def test_statistics_are_reused_and_checked(demo_runs, tmp_path, monkeypatch):
    import tuckerize.calibrate as cal

    def boom(*a, **k):
        raise AssertionError("statistics recollected")

    monkeypatch.setattr(cal, "collect_statistics", boom)
    # same settings, explicit --stats: no collection
    m = decompose_checkpoint(str(DEMO), tmp_path / "a", ranks=(16, 32, 16), calibration="demo", samples=SAMPLES,
                             seqlen=SEQLEN, stats=demo_runs["white"])
    assert m["calibration"]["settings"]["samples"] == SAMPLES
    # statistics found in the output folder are reused too (another rank choice, --overwrite keeps them)
    decompose_checkpoint(str(DEMO), tmp_path / "a", ranks=(16, 40, 20), calibration="demo", samples=SAMPLES,
                         seqlen=SEQLEN, overwrite=True)
    with pytest.raises(CalibrationError, match="other settings"):
        decompose_checkpoint(str(DEMO), tmp_path / "b", ranks=(16, 32, 16), calibration="demo", samples=SAMPLES + 1,
                             seqlen=SEQLEN, stats=demo_runs["white"])
    with pytest.raises(CalibrationError, match="do not exist"):
        decompose_checkpoint(str(DEMO), tmp_path / "c", ranks=(16, 32, 16), stats=tmp_path / "nowhere")
    # statistics of an older format (no per-expert fields) are refused when passed, skipped when found
    old = tmp_path / "old"
    old.mkdir()
    for name in ("calibration_stats.safetensors", "calibration_stats.json"):
        (old / name).write_bytes((demo_runs["white"] / name).read_bytes())
    meta = json.loads((old / "calibration_stats.json").read_text())
    meta["settings"]["version"] = 1
    (old / "calibration_stats.json").write_text(json.dumps(meta))
    with pytest.raises(CalibrationError, match="format 1, this tuckerize reads format 2"):
        decompose_checkpoint(str(DEMO), tmp_path / "d", ranks=(16, 32, 16), stats=old)
    # per-expert hidden covariances are not in statistics collected without them
    with pytest.raises(CalibrationError, match="hidden_expert"):
        decompose_checkpoint(str(DEMO), tmp_path / "e", ranks=(16, 32, 16), stats=demo_runs["white"],
                             whiten_options=WhitenOptions(expert_hidden=True))


def test_resume_refuses_other_calibration_settings(demo_runs, tmp_path):
    out = tmp_path / "o"
    decompose_checkpoint(str(DEMO), out, ranks=UNIFORM, stats=demo_runs["white"])
    with pytest.raises(OutputConflictError, match="other settings"):
        decompose_checkpoint(str(DEMO), out, ranks=UNIFORM)  # plain Tucker into a whitened folder
    with pytest.raises(OutputConflictError, match="other settings"):
        decompose_checkpoint(str(DEMO), out, ranks=UNIFORM, stats=demo_runs["white"],
                             whiten_options=WhitenOptions(damp=0.5))


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


# ------------------------------------------------------------------------ CLI errors


def cli(*args: str):
    from typer.testing import CliRunner

    from tuckerize.cli import app

    return CliRunner().invoke(app, ["decompose", *args])


@pytest.mark.parametrize(
    "args, fragment",
    [
        (("--ratio", "0"), "outside (0, 1]"),
        (("--ratio", "1.5"), "outside (0, 1]"),
        (("--params", "0"), "--params 0"),
        (("--ratio", "0.5", "--ranks", "16,64,32"), "exactly one"),
        (("--ratio", "0.5", "--calibration", "/no/such/text.txt"), "does not exist"),
        (("--ranks", "16,64,32", "--sequential"), "--sequential needs --calibration"),
        (("--ranks", "16,64,32", "--calibration", "demo", "--config", "METHOD damp: 0"), "method.damp 0"),
        (("--ratio", "0.5", "--expert-rank", "some"), "--expert-rank"),
        (("--ranks", "16,64,32", "--stats", "/no/such/stats"), "do not exist"),
        (("--ranks", "16,64,32", "--calibration", "demo", "--config", "METHOD whitening: both"), "method.whitening 'both'"),
        (("--ranks", "16,64,32", "--calibration", "demo", "--config", "METHOD {whitening: pooled, expert_hidden: true}"),
         "expert_hidden needs"),
        (("--ranks", "16,64,32", "--calibration", "demo", "--config", "METHOD als_iters: -1"), "method.als_iters -1"),
        (("--ranks", "16,64,32", "--calibration", "demo", "--samples", "100000", "--seqlen", "512"), "fewer than"),
    ],
)
def test_cli_errors_are_one_line(tmp_path, args, fragment):
    """(``METHOD x: y``: a --config file whose method: section is ``x: y``.)"""
    args = list(args)
    for i, a in enumerate(args):
        if a.startswith("METHOD "):
            body = a.removeprefix("METHOD ")
            (tmp_path / "m.yaml").write_text(f"method: {body}\n" if body.startswith("{") else f"method:\n  {body}\n")
            args[i] = str(tmp_path / "m.yaml")
    assert_cli_error(cli(*args, "--out", str(tmp_path / "o")), fragment)


def test_cli_error_real_process(tmp_path):
    r = subprocess.run([sys.executable, "-m", "tuckerize", "decompose", "--ratio", "2", "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "--ratio 2" in lines[0], r.stderr


def test_cli_allocates_from_saved_statistics(tmp_path, demo_runs):
    r = cli("--ratio", "0.7", "--stats", str(demo_runs["white"]), "--out", str(tmp_path / "p"),
            "--save-config", str(tmp_path / "p.yaml"), "--json")
    assert r.exit_code == 0, r.output
    m = json.loads(r.stdout)
    assert m["allocation"]["config"] == str(tmp_path / "p.yaml") and load_plan(tmp_path / "p.yaml")
    assert abs(m["params"]["experts_ratio"] - 0.7) < 0.007
    assert m["calibration"]["settings"]["samples"] == SAMPLES  # the settings of the reused statistics


def test_expert_hidden_covariances(demo_runs, tmp_path):
    """--expert-hidden: statistics with each expert's own hidden covariance, used as the
    hidden-side weight; every layer's calibration output error still beats the pooled whitening."""
    out = tmp_path / "eh"
    m = decompose_checkpoint(str(DEMO), out, ranks=UNIFORM, calibration="demo", samples=SAMPLES, seqlen=SEQLEN,
                             per_expert_stats=True, whiten_options=WhitenOptions(expert_hidden=True))
    assert m["calibration"]["whitening"]["expert_hidden"] is True
    assert CalibrationStats.load(out).layers[0]["hidden_expert"].shape == (16, 128, 128)
    pooled, eh = moe_output_errors(DEMO, [demo_runs["pooled"], out], demo_runs["tokens"])
    for layer in pooled:
        assert eh[layer] < 0.97 * pooled[layer], (layer, pooled[layer], eh[layer])


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


def test_refit_with_per_expert_weighting(demo_runs, tmp_path):
    """--refit on top of the per-expert weighting (the default): gate/up cores refitted with
    each expert's own hidden covariance, down kept; every layer's output error falls."""
    out = tmp_path / "refit"
    m = decompose_checkpoint(str(DEMO), out, ranks=UNIFORM, calibration="demo", samples=SAMPLES, seqlen=SEQLEN,
                             stats=demo_runs["white"], refit=True)
    assert all(t["refit"] for t in m["tensors"] if t["projection"] != "down")
    assert all("refit" not in t for t in m["tensors"] if t["projection"] == "down")
    white, refit = moe_output_errors(DEMO, [demo_runs["white"], out], demo_runs["tokens"])
    for layer in white:
        assert refit[layer] < white[layer], (layer, white[layer], refit[layer])
    a, b = TuckerCheckpoint.open(demo_runs["white"]), TuckerCheckpoint.open(out)
    kept, refitted = (rel(b.factors(1, p)["core"], a.factors(1, p)["core"]) for p in ("down", "up"))
    assert kept < 1e-5 and refitted > 1e-3, (kept, refitted)


def test_refit_cores_solve_the_two_sided_problem():
    """RefitCollector.cores with output-side weights against numpy's solve of the
    Kronecker-form normal equations (A_e (x) Q_e^T + lam) vec(G) = vec(rhs + lam G0)."""
    import numpy as np

    from tuckerize.calibrate import RefitCollector

    g = torch.Generator().manual_seed(0)
    E, H, I, rH, rI = 3, 10, 8, 4, 5
    stacked = {p: torch.randn(E, H, I, generator=g) for p in ("gate", "up", "down")}
    q = lambda n, r: torch.linalg.qr(torch.randn(n, r, generator=g))[0]  # noqa: E731
    factors = {p: {"U_E": torch.eye(E), "U_H": q(H, rH), "U_I": q(I, rI), "core": torch.randn(E, rH, rI, generator=g)}
               for p in ("gate", "up", "down")}
    rc = RefitCollector(stacked, "silu", factors, ("gate", "up"))
    for p in ("gate", "up"):
        z = torch.randn(E, 30, rH, generator=g, dtype=torch.float64)
        rc.A[p] = z.transpose(1, 2) @ z
        rc.B[p] = torch.randn(E, rH, I, generator=g, dtype=torch.float64)
    m = torch.randn(E, I, I, generator=g, dtype=torch.float64)
    Bw = m @ m.transpose(1, 2) + torch.eye(I, dtype=torch.float64)
    damp = 0.05
    got = rc.cores(damp, {"gate": Bw, "up": None})
    for p, W in (("gate", Bw), ("up", None)):
        U_I = factors[p]["U_I"].double().numpy()
        for e in range(E):
            A = rc.A[p][e].numpy()
            Bm = np.eye(I) if W is None else W[e].numpy()
            Q = U_I.T @ Bm @ U_I
            lam = damp * np.trace(A) / rH * np.trace(Q) / rI
            G0 = factors[p]["core"][e].double().numpy()
            rhs = rc.B[p][e].numpy() @ Bm @ U_I + lam * G0
            K = np.kron(A, Q.T) + lam * np.eye(rH * rI)  # row-major vec: vec(A G Q) = (A (x) Q^T) vec(G)
            ref = np.linalg.solve(K, rhs.reshape(-1)).reshape(rH, rI)
            assert np.linalg.norm(got[p][e].double().numpy() - ref) / np.linalg.norm(ref) < 1e-5, (p, e)

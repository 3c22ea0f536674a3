"""``tuckerize decompose --bytes B`` end to end on the demo model: the budget is kept (every
stored byte counted), the manifest and the report say how it was spent, every stored form runs
in the native runtime equal to an independent float64 reference, ``eval`` and ``shard`` (tp=2,
gloo) run it with the base packed, the vLLM plugin refuses it in one line; bad budgets are one
line and write nothing."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from calibration_common import DEMO, cli
from cli_helpers import assert_cli_error

from tuckerize.arch import PROJECTIONS
from tuckerize.compress import decompose_checkpoint

SAMPLES, SEQLEN = 16, 64
DENSE = 3 * 16 * 128 * 64 * 2 * 4  # the demo's bf16 dense experts
BUDGET = 0.17  # below int3 everywhere: a mix of Tucker, bases and (here) a residual


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The CLI's run (its report kept for the test of the table), the manifest it wrote."""
    out = tmp_path_factory.mktemp("bytes") / "b"
    r = cli("--model", str(DEMO), "--bytes", str(BUDGET), "--calibration", "demo", "--samples", str(SAMPLES),
            "--seqlen", str(SEQLEN), "--out", str(out))
    assert r.exit_code == 0, r.output
    return out, json.loads((out / "tuckerize_manifest.json").read_text()), r.stderr  # the console writes to stderr


def test_report_says_how_the_budget_was_spent(run):
    report = run[2]
    assert "stored as" in report and " base" in report
    flat = " ".join(report.split())  # the console wraps at its width
    assert "--bytes 0.17:" in flat and "bytes budgeted" in flat and "smallest storable form" in flat
    assert "projections stored as" in flat


def test_library_call_takes_bytes_budget(tmp_path):
    """decompose_checkpoint(bytes_budget=B) is the call the CLI makes: the same refusal of a
    conflicting option, before any work."""
    from tuckerize.errors import RankError

    with pytest.raises(RankError, match="drop --ratio"):
        decompose_checkpoint(str(DEMO), tmp_path / "o", bytes_budget=0.2, ratio=0.5, calibration="demo")
    assert not (tmp_path / "o").exists()


def _expert_bytes(folder: Path) -> int:
    from safetensors import safe_open

    total = 0
    for f in sorted(folder.glob("model-*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():
                if ".mlp.experts." in k:
                    t = st.get_tensor(k)
                    total += t.numel() * t.element_size()
    return total


def test_budget_kept_and_spending_recorded(run):
    out, manifest, _ = run
    b = manifest["bytes"]
    assert b["experts_stored"] <= BUDGET * DENSE
    assert b["experts_stored"] == _expert_bytes(out)  # codes, scales, zeros, shapes: all counted
    assert b["budget"]["fraction"] == BUDGET and b["budget"]["stored"] == b["experts_stored"]
    assert sum(p["bytes"] for p in b["projections"]) == b["experts_stored"]
    assert b["budget"]["smallest_feasible"] < b["experts_stored"]
    forms = {p["form"] for p in b["projections"]}
    assert "base" in forms or "base+tucker" in forms
    config = json.loads((out / "config.json").read_text())["tucker"]
    assert config["format_version"] == 3
    for p in b["projections"]:
        entry = config["layers"][str(p["layer"])][p["projection"]]
        assert entry["form"] == p["form"] and (entry["ranks"] is None) == (p["ranks"] is None)
        assert (entry.get("base") is None) == (p["base"] is None)
    assert manifest["rank_plan"]["source"] == "bytes"


def _reference_weights(folder: Path, layer: int) -> dict[str, torch.Tensor]:
    """Every stored tensor of ``layer`` dequantised (float64), base + Tucker summed: ``{p: [E, H, I]}``."""
    from tuckerize.checkpoint import Checkpoint
    from tuckerize.quant import decode

    ck = Checkpoint.open(folder)
    prefix = f"model.layers.{layer}.mlp.experts"
    keys = set(ck.weight_map)
    stored = {k: ck.get(k) for k in keys if k.startswith(prefix)}
    W = {}
    for p in PROJECTIONS:
        w = torch.zeros(16, 128, 64, dtype=torch.float64)
        if f"{prefix}.{p}.base.qcodes" in stored:
            base = decode(stored, f"{prefix}.{p}.base").double()
            w += base if p == "down" else base.transpose(1, 2)
        if any(k.startswith(f"{prefix}.{p}.U_H") for k in stored):
            f = {k: decode(stored, f"{prefix}.{p}.{k}").double() for k in ("U_E", "U_H", "U_I", "core")}
            w += torch.einsum("ea,abc,hb,ic->ehi", f["U_E"], f["core"], f["U_H"], f["U_I"])
        W[p] = w
    return W


def test_native_runtime_equals_float64_reference(run):
    from base_forms import reference_moe

    from tuckerize.runtime.base_experts import BaseResidualExperts
    from tuckerize.runtime.loader import TensorSource, build_moe_block

    out, _, _ = run
    source = TensorSource.open(out)
    x = torch.randn(20, 128, generator=torch.Generator().manual_seed(0))
    seen = set()
    for layer in range(4):
        block = build_moe_block(source, layer, dtype=torch.float64)
        seen.add(type(block.experts).__name__)
        if isinstance(block.experts, BaseResidualExperts):  # every base held packed, as stored
            for p in PROJECTIONS:
                if hasattr(getattr(block.experts, p), "base"):
                    assert getattr(block.experts, p).base.codes.dtype == torch.uint8
        top_w, top_i = block.gate(x.double())
        got = block.experts(x.double(), top_i, top_w)
        ref = reference_moe(_reference_weights(out, layer), x, top_i, top_w)
        assert float(torch.linalg.norm(got - ref) / torch.linalg.norm(ref)) < 1e-6
    assert "BaseResidualExperts" in seen


def test_eval_runs_the_stored_forms(run):
    from tuckerize.evaluate import evaluate

    out, _, _ = run
    report = evaluate(str(out), text="demo", seqlen=64, max_windows=4, use_cache=False)
    assert math.isfinite(report["tucker_result"]["perplexity"])
    assert 0 < report["fidelity"]["kl_mean"] < 1.0 and len(report["fidelity"]["layer_relative_error"]) == 4
    assert report["compression_bytes"]["budget"]["fraction"] == BUDGET


@pytest.mark.parametrize("layout", ["expert", "intermediate"])
def test_shard_tp2_round_trip_keeps_the_base_packed(run, tmp_path, layout):
    """Each rank's packed base is a slice of the unsharded one, codes and all (``expert``: its
    experts; ``intermediate``: whole groups of down's input axis, which on the demo, I = 64 in
    one group of 64, leaves rank 1 none), and two gloo processes give the single-process output."""
    import numpy as np
    from dist_helpers import moe_block_worker, run_workers

    from tuckerize.checkpoint import Checkpoint
    from tuckerize.quant import decode
    from tuckerize.runtime.loader import TensorSource, build_moe_block
    from tuckerize.shard import shard_checkpoint

    out, _, _ = run
    shards = tmp_path / "tp2"
    shard_checkpoint(str(out), 2, layout=layout, out=shards)
    full = Checkpoint.open(out)
    for r in range(2):
        rank = Checkpoint.open(shards / f"rank-{r:05d}-of-00002")
        bases = sorted({k[: -len(".qcodes")] for k in rank.weight_map if k.endswith(".base.qcodes")})
        assert bases
        for name in bases:
            assert rank.get(f"{name}.qcodes").dtype == torch.uint8
            part = decode({k: rank.get(k) for k in rank.weight_map if k.startswith(name + ".")}, name)
            whole = decode({k: full.get(k) for k in full.weight_map if k.startswith(name + ".")}, name)
            if layout == "expert":
                assert torch.equal(part, whole[:8] if r == 0 else whole[8:])
            else:
                axis = 2 if name.endswith("down.base") else 1
                width = part.shape[axis]
                assert torch.equal(part, whole.narrow(axis, 0 if r == 0 else whole.shape[axis] - width, width))
    x = torch.randn(12, 128, generator=torch.Generator().manual_seed(1))
    np.save(tmp_path / "x.npy", x.numpy())
    jobs = [{"name": "b", "shard_dir": str(shards), "input": str(tmp_path / "x.npy"), "layers": [0, 1, 2, 3]}]
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    run_workers(moe_block_worker, 2, (str(tmp_path / "jobs.json"), str(tmp_path)), timeout=240)
    single = TensorSource.open(out)
    for layer in range(4):
        ref = build_moe_block(single, layer)(x)
        for r in range(2):
            got = torch.from_numpy(np.load(tmp_path / f"b-L{layer}-r{r}.npy"))
            assert float(torch.linalg.norm(got - ref) / torch.linalg.norm(ref)) < 1e-5


def test_vllm_plugin_refuses_a_base_in_one_line(run):
    from tuckerize.errors import InputError
    from tuckerize.integrations.vllm.checks import check_tucker_config

    out, _, _ = run
    config = json.loads((out / "config.json").read_text())
    with pytest.raises(InputError, match=r"stores \w+ as a packed int\d base") as e:
        check_tucker_config(config, "config.json", {}, {})
    assert "\n" not in str(e.value) and "native runtime" in str(e.value)


@pytest.mark.parametrize("args,fragments", [
    (["--bytes", "0.001", "--calibration", "demo"], ["--bytes 0.001", "smallest feasible budget is --bytes 0.0"]),
    (["--bytes", "0.2", "--ratio", "0.5", "--calibration", "demo"], ["drop --ratio"]),
    (["--bytes", "0.2", "--ranks", "16,8,8", "--calibration", "demo"], ["drop --ranks"]),
    (["--bytes", "0.2", "--factor-dtype", "int4", "--calibration", "demo"], ["drop --factor-dtype"]),
    (["--bytes", "1.5", "--calibration", "demo"], ["--bytes 1.5 is outside (0, 1]"]),
    (["--bytes", "0.2"], ["--bytes needs --calibration"]),
])
def test_bad_budgets_are_one_line_and_write_nothing(tmp_path, args, fragments):
    out = tmp_path / "o"
    r = cli("--model", str(DEMO), *args, "--samples", "4", "--seqlen", "32", "--out", str(out))
    assert_cli_error(r, *fragments)
    assert not out.exists()


def test_the_smallest_feasible_budget_it_names_is_accepted(tmp_path):
    """The refusal names a budget that passes the same check (before any statistics)."""
    from tuckerize.arch import moe_spec
    from tuckerize.checkpoint import load_config
    from tuckerize.compress.bytes_plan import check_bytes_budget
    from tuckerize.compress.method import BytesMethod
    from tuckerize.errors import RankError

    spec = moe_spec(load_config(DEMO))
    with pytest.raises(RankError) as e:
        check_bytes_budget(spec, 0.001, BytesMethod())
    named = float(str(e.value).split("smallest feasible budget is --bytes ")[1].split()[0])
    check_bytes_budget(spec, named, BytesMethod())

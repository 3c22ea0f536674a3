"""``tuckerize shard``: every rank file against the unsharded Tucker checkpoint.

The expected split of each tensor is derived here from the tensor's name and the
config (heads, kv heads, sizes), independently of :func:`tuckerize.runtime.plan.rank_splits`; rank
files are read with safetensors directly and checksums with hashlib.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from cli_helpers import assert_cli_error
from safetensors.torch import load_file

from tuckerize.errors import ShardError
from tuckerize.parallel import LAYOUTS, ParallelContext
from tuckerize.runtime.loader import TensorSource
from tuckerize.runtime.model import CausalLM
from tuckerize.shard import shard_checkpoint
from tuckerize.shardset import SHARD_MANIFEST, ShardSet

#: Tiny Qwen3-MoE (4 q heads, 2 kv heads, E=8, I=16) and Qwen2-MoE with a shared expert
#: (4 heads, 2 kv heads, attention biases, E=6, I=18 so that I splits unevenly over 4).
MODELS = {"qwen3_moe": {}, "qwen2_moe": {"moe_intermediate_size": 18}}


def _read_all(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _even_ranges(n: int, tp: int) -> list[tuple[int, int]]:
    """Contiguous ranges, the first n % tp ranks one longer (written out, not imported)."""
    out, start = [], 0
    for r in range(tp):
        size = n // tp + (1 if r < n % tp else 0)
        out.append((start, start + size))
        start += size
    return out


def _expected_split(name: str, shape: list[int], cfg: dict, tp: int, layout: str):
    """(axis, [ranges per rank]) or None for replicated."""
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    if ".experts." in name:
        factor = name.rsplit(".", 1)[1]
        if (factor, layout) in (("U_I", "intermediate"), ("U_E", "expert"), ("U_E", "hybrid"),
                                ("U_E", "hybrid-replicated-out")):
            return 0, _even_ranges(shape[0], tp)
        if (factor, layout) == ("U_H", "hybrid"):  # down: rows of H; gate, up: columns of r_H
            return (0, _even_ranges(shape[0], tp)) if ".down." in name else (1, _even_ranges(shape[1], tp))
        if (factor, layout) == ("U_H", "hybrid-replicated-out"):  # gate, up: columns of r_H; down replicated
            return None if ".down." in name else (1, _even_ranges(shape[1], tp))
        return None
    if ".self_attn.q_proj." in name:
        per = heads // tp
        return 0, [(r * per * head_dim, (r + 1) * per * head_dim) for r in range(tp)]
    if ".self_attn.o_proj." in name:
        per = heads // tp
        return 1, [(r * per * head_dim, (r + 1) * per * head_dim) for r in range(tp)]
    if ".self_attn.k_proj." in name or ".self_attn.v_proj." in name:
        if kv % tp == 0:
            per = kv // tp
            return 0, [(r * per * head_dim, (r + 1) * per * head_dim) for r in range(tp)]
        # Fewer kv heads than ranks: each rank keeps the kv head of its query heads.
        kv_of_rank = [(r * (heads // tp)) // (heads // kv) for r in range(tp)]
        return 0, [(h * head_dim, (h + 1) * head_dim) for h in kv_of_rank]
    if name.endswith(("embed_tokens.weight", "lm_head.weight")):
        return 0, _even_ranges(shape[0], tp)
    if ".shared_expert." in name:
        if name.endswith("down_proj.weight"):
            return 1, _even_ranges(shape[1], tp)
        return 0, _even_ranges(shape[0], tp)
    return None  # norms, routers, shared_expert_gate


@pytest.fixture(scope="module", params=list(MODELS))
def model(request, tucker_factory):
    arch = request.param
    return arch, tucker_factory(arch, **MODELS[arch])[1]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("tp", [2, 4])
def test_rank_files_are_slices_of_the_whole(model, tp, layout, tmp_path):
    arch, tucker = model
    out = tmp_path / "shards"
    manifest = shard_checkpoint(tucker, tp, layout=layout, out=out)
    assert (manifest["tp"], manifest["layout"]) == (tp, layout)
    assert json.loads((out / SHARD_MANIFEST).read_text())["splits"] == manifest["splits"]
    cfg = json.loads((tucker / "config.json").read_text())
    shard_cfg = json.loads((out / "config.json").read_text())
    assert shard_cfg["shard"] == {"tp": tp, "layout": layout}
    assert shard_cfg["tucker"] == cfg["tucker"]
    whole = _read_all(tucker)
    assert len(whole) > 20

    # Rank folders: only their own files, each with the manifest's checksum.
    rank_dirs = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert rank_dirs == [f"rank-{r:05d}-of-{tp:05d}" for r in range(tp)]
    ranks = []
    for r, entry in enumerate(manifest["ranks"]):
        folder = out / entry["dir"]
        assert entry["dir"] == rank_dirs[r]
        assert sorted(p.name for p in folder.iterdir()) == sorted([*entry["files"], "model.safetensors.index.json"])
        for filename, info in entry["files"].items():
            data = (folder / filename).read_bytes()
            assert hashlib.sha256(data).hexdigest() == info["sha256"]
            assert len(data) == info["bytes"]
        index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
        assert set(index.values()) <= set(entry["files"])
        tensors = _read_all(folder)
        assert set(tensors) == set(whole) == set(index)
        ranks.append(tensors)

    # Each tensor: the slice the manifest names, which is the slice expected from its semantics.
    splits = manifest["splits"]
    n_split = 0
    for name, full in whole.items():
        expected = _expected_split(name, list(full.shape), cfg, tp, layout)
        if expected is None:
            assert name not in splits, name
            for r in range(tp):
                assert torch.equal(ranks[r][name], full), (name, r)
            continue
        n_split += 1
        axis, want = expected
        entry = splits[name]
        assert entry["axis"] == axis and entry["full"] == list(full.shape), name
        assert [tuple(x) for x in entry["ranges"]] == want, (name, entry["ranges"], want)
        for r, (a, b) in enumerate(entry["ranges"]):
            assert torch.equal(ranks[r][name], full.narrow(axis, a, b - a)), (name, r)
        # Concatenating the distinct slices in rank order gives the whole, exactly.
        distinct = []
        for r, rng in enumerate(entry["ranges"]):
            if not distinct or distinct[-1][0] != tuple(rng):
                distinct.append((tuple(rng), ranks[r][name]))
        assert [rng for rng, _ in distinct] == sorted({tuple(x) for x in entry["ranges"]})
        assert torch.equal(torch.cat([t for _, t in distinct], dim=axis), full), name
        replicated_kv = (".k_proj." in name or ".v_proj." in name) and tp > cfg["num_key_value_heads"]
        assert len(distinct) == (cfg["num_key_value_heads"] if replicated_kv else tp), name
    assert n_split == len(splits)

    # Every layout splits something of the experts; U_H and the cores are never split.
    factor_splits = {n.rsplit(".", 1)[1] for n in splits if ".experts." in n}
    assert factor_splits == {"intermediate": {"U_I"}, "expert": {"U_E"}, "hybrid": {"U_E", "U_H"},
                             "hybrid-replicated-out": {"U_E", "U_H"}}[layout]

    # The runtime builds the same rank model from the unsharded checkpoint (sliced as it
    # loads) and from the shard set (rank files taken as they are).
    for r in range(tp):
        src = TensorSource.open(tucker, parallel=ParallelContext(rank=r, world=tp), layout=layout)
        shard = TensorSource.open(out, parallel=ParallelContext(rank=r, world=tp))
        assert shard.kind == "shard" and shard.layout == layout
        assert Path(shard.tensors.folder) == out / f"rank-{r:05d}-of-{tp:05d}"
        built = [CausalLM(s, dtype=torch.float32, device="cpu").state_dict() for s in (src, shard)]
        assert built[0].keys() == built[1].keys() and len(built[0]) > 20
        for key, t in built[0].items():
            assert torch.equal(t, built[1][key]), (key, r)


def test_kv_heads_replicated_when_tp_exceeds_them(tucker_factory, tmp_path):
    _, tucker = tucker_factory("qwen3_moe")
    manifest = shard_checkpoint(tucker, 4, out=tmp_path / "s")
    whole = _read_all(tucker)
    k = whole["model.layers.0.self_attn.k_proj.weight"]  # 2 kv heads x head_dim 8
    assert k.shape[0] == 16
    got = [_read_all(tmp_path / "s" / r["dir"])["model.layers.0.self_attn.k_proj.weight"] for r in manifest["ranks"]]
    assert [g.shape[0] for g in got] == [8] * 4
    assert torch.equal(got[0], k[:8]) and torch.equal(got[1], k[:8])
    assert torch.equal(got[2], k[8:]) and torch.equal(got[3], k[8:])


def test_default_output_folder_and_overwrite(tucker_factory, tmp_path):
    _, tucker = tucker_factory("qwen3_moe")
    copy = shutil.copytree(tucker, tmp_path / "tk")
    manifest = shard_checkpoint(copy, 2)
    out = Path(manifest["out"])
    assert out == (tmp_path / "tk-tp2-intermediate").resolve()
    assert not list(tmp_path.glob(".*partial"))
    from tuckerize.errors import OutputConflictError

    with pytest.raises(OutputConflictError, match="--overwrite"):
        shard_checkpoint(copy, 2)
    assert shard_checkpoint(copy, 2, overwrite=True)["tp"] == 2


# ------------------------------------------------------------------ CLI errors


def cli(*args: str):
    from typer.testing import CliRunner

    from tuckerize.cli import app

    return CliRunner().invoke(app, list(args))


def test_cli_success_json(tucker_factory, tmp_path):
    _, tucker = tucker_factory("qwen3_moe")
    out = tmp_path / "s"
    result = cli("shard", str(tucker), "--tp", "2", "--layout", "expert", "--out", str(out), "--json")
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    on_disk = json.loads((out / SHARD_MANIFEST).read_text())
    assert printed["splits"] == on_disk["splits"] and printed["ranks"] == on_disk["ranks"]
    assert (printed["tp"], printed["layout"]) == (2, "expert")


def test_cli_tp_not_dividing_heads(tucker_factory, tmp_path):
    _, tucker = tucker_factory("qwen3_moe")
    line = assert_cli_error(cli("shard", str(tucker), "--tp", "3", "--out", str(tmp_path / "s")),
                            "--tp 3", "4 attention heads")
    valid = [int(v) for v in line.split("use one of:")[1].replace(" ", "").split(",")]
    assert valid == [1, 2, 4]
    assert not (tmp_path / "s").exists()


def test_cli_unknown_layout(tucker_factory, tmp_path):
    _, tucker = tucker_factory("qwen3_moe")
    assert_cli_error(cli("shard", str(tucker), "--tp", "2", "--layout", "diagonal", "--out", str(tmp_path / "s")),
                     "diagonal", "intermediate", "expert")
    assert not (tmp_path / "s").exists()


def test_cli_missing_tucker_checkpoint(tmp_path):
    missing = tmp_path / "no" / "such"
    assert_cli_error(cli("shard", str(missing), "--tp", "2", "--out", str(tmp_path / "s")), str(missing))
    assert not (tmp_path / "s").exists()


def test_cli_original_checkpoint_is_not_tucker(tiny_factory, tmp_path):
    assert_cli_error(cli("shard", str(tiny_factory("qwen3_moe")), "--tp", "2", "--out", str(tmp_path / "s")),
                     "tuckerize decompose")


def test_cli_existing_unrelated_output(tucker_factory, tmp_path):
    _, tucker = tucker_factory("qwen3_moe")
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert_cli_error(cli("shard", str(tucker), "--tp", "2", "--out", str(out)), str(out), "not a shard set")
    assert_cli_error(cli("shard", str(tucker), "--tp", "2", "--out", str(out), "--overwrite"), "not a shard set")
    assert (out / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


# ------------------------------------------------------------------ reading a damaged or mismatched shard set


@pytest.fixture
def shard_copy(tucker_factory, tmp_path):
    """A fresh tp=2 shard set of the tiny Qwen3-MoE in tmp_path (safe to damage)."""
    _, tucker = tucker_factory("qwen3_moe")
    out = tmp_path / "shards"
    shard_checkpoint(tucker, 2, out=out)
    return out


def test_rank_folder_wrong_world(shard_copy):
    shards = ShardSet.open(shard_copy)
    assert shards.tp == 2 and shards.layout == "intermediate"
    assert shards.rank_folder(1, 2) == shard_copy / "rank-00001-of-00002"
    with pytest.raises(ShardError, match=r"tp=2.*3 processes"):
        shards.rank_folder(0, 3)
    with pytest.raises(ShardError, match="tp=2"):
        shards.rank_folder(0, 1)


def test_tensor_source_wrong_world_or_layout(shard_copy):
    with pytest.raises(ShardError, match="tp=2"):
        TensorSource.open(shard_copy, parallel=ParallelContext(rank=0, world=4))
    with pytest.raises(ShardError, match="layout"):
        TensorSource.open(shard_copy, parallel=ParallelContext(rank=0, world=2), layout="expert")
    # Without a process group: one rank of one, which the tp=2 set refuses too.
    with pytest.raises(ShardError, match="tp=2"):
        TensorSource.open(shard_copy)


def test_missing_rank_file(shard_copy):
    manifest = json.loads((shard_copy / SHARD_MANIFEST).read_text())
    victim = sorted(manifest["ranks"][1]["files"])[-1]
    (shard_copy / "rank-00001-of-00002" / victim).unlink()
    shards = ShardSet.open(shard_copy)
    with pytest.raises(ShardError, match=rf"{victim}.*missing"):
        shards.rank_folder(1, 2)
    assert shards.rank_folder(0, 2)  # rank 0 reads only its own files


def test_corrupted_rank_file(shard_copy):
    folder = shard_copy / "rank-00000-of-00002"
    victim = sorted(folder.glob("*.safetensors"))[-1]
    data = bytearray(victim.read_bytes())
    for i in range(len(data) - 64, len(data) - 56):  # inside the tensor data, same size
        data[i] ^= 0xFF
    victim.write_bytes(bytes(data))
    shards = ShardSet.open(shard_copy)
    with pytest.raises(ShardError, match=rf"{victim.name}.*corrupted"):
        shards.rank_folder(0, 2)
    with pytest.raises(ShardError, match="corrupted"):
        TensorSource.open(shard_copy, parallel=ParallelContext(rank=0, world=2))
    assert shards.rank_folder(1, 2)
    # A truncated file is caught by its size even without hashing.
    victim.write_bytes(bytes(data[:-10]))
    with pytest.raises(ShardError, match="corrupted"):
        shards.rank_folder(0, 2, verify=False)


def test_unfinished_shard_set(shard_copy):
    (shard_copy / SHARD_MANIFEST).unlink()
    with pytest.raises(ShardError, match=SHARD_MANIFEST):
        ShardSet.open(shard_copy)


# ------------------------------------------------------------------ experts assigned to ranks by measured load


def test_experts_assigned_by_measured_load(tucker_factory, tmp_path):
    """A skewed measured load: the contiguous split would leave one rank with most of the
    pairs, so the writer assigns experts by load, records it in the manifest and the
    config, writes each rank exactly its experts' U_E rows, and the ranks' partial sums
    still give the single-process output."""
    import tucker_refs as R
    from tuckerize.runtime.loader import build_moe_block

    _, tucker = tucker_factory("qwen3_moe")
    single = TensorSource.open(tucker, parallel=ParallelContext())
    spec = single.spec
    E = spec.num_experts
    load = {L: [100.0] * (E // 2) + [1.0] * (E - E // 2) for L in spec.moe_layers}
    out = tmp_path / "s"
    manifest = shard_checkpoint(tucker, 2, layout="expert", out=out, expert_load=load)
    whole = _read_all(tucker)
    for L in spec.moe_layers:
        a = manifest["expert_assignment"][str(L)]
        assert a["assigned"] and a["imbalance_contiguous"] > 0.2 and a["imbalance"] < 0.05, a
        assert sorted(sum(a["ranks"], [])) == list(range(E))
        name = f"{spec.arch.experts_prefix(L)}.gate.U_E"
        assert manifest["splits"][name]["rows"] == a["ranks"]
        for r in range(2):
            got = _read_all(out / manifest["ranks"][r]["dir"])[name]
            assert torch.equal(got, whole[name][a["ranks"][r]])
    assert json.loads((out / "config.json").read_text())["shard"]["experts"] == {
        str(L): manifest["expert_assignment"][str(L)]["ranks"] for L in spec.moe_layers}

    L = spec.moe_layers[0]
    x = torch.randn(11, spec.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        block = build_moe_block(single, L)
        top_w, top_i = block.gate(x)
        ref = block.experts(x, top_i, top_w)
        parts = []
        for r in range(2):
            experts = build_moe_block(TensorSource.open(out, parallel=ParallelContext(rank=r, world=2)), L).experts
            assert list(experts.expert_ids) == manifest["expert_assignment"][str(L)]["ranks"][r]
            parts.append(experts.partial(x, top_i, top_w))
        assert R.rel_err(ref, experts.finish(parts[0] + parts[1])) < 1e-5


def test_even_load_keeps_the_contiguous_split(tucker_factory, tmp_path):
    _, tucker = tucker_factory("qwen3_moe")
    spec = TensorSource.open(tucker, parallel=ParallelContext()).spec
    load = {L: [10.0] * spec.num_experts for L in spec.moe_layers}
    manifest = shard_checkpoint(tucker, 2, layout="hybrid", out=tmp_path / "s", expert_load=load)
    assert not any(a["assigned"] for a in manifest["expert_assignment"].values())
    assert "experts" not in json.loads((tmp_path / "s" / "config.json").read_text())["shard"]


# ------------------------------------------------------------------ --model and the chosen layout


def test_cli_model_option_and_positional(tucker_factory, tmp_path):
    _, tucker = tucker_factory("qwen3_moe")
    for i, args in enumerate((["-m", str(tucker)], ["--model", str(tucker)], [str(tucker), "--model", str(tucker)])):
        out = tmp_path / f"s{i}"
        result = cli("shard", *args, "--tp", "2", "--layout", "expert", "--out", str(out), "--json")
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["layout"] == "expert"
    assert_cli_error(cli("shard", str(tucker), "--model", str(tmp_path / "other"), "--tp", "2"), "give one")
    assert_cli_error(cli("shard", "--tp", "2"), "--model")


def test_cli_default_layout_is_chosen_by_the_arithmetic(tucker_factory, tmp_path):

    from tuckerize.runtime.layout import layout_costs

    _, tucker = tucker_factory("qwen3_moe")
    result = cli("shard", "-m", str(tucker), "--tp", "2", "--out", str(tmp_path / "s"))
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "s" / SHARD_MANIFEST).read_text())
    costs = layout_costs(json.loads((tucker / "config.json").read_text()), 2)
    ok = [l for l in LAYOUTS if costs[l]["sent"] <= costs["dense"]["sent"]]
    assert manifest["layout"] == min(ok, key=lambda l: costs[l]["macs"])
    assert manifest["layout_choice"]["macs_per_token"]["hybrid"] == pytest.approx(costs["hybrid"]["macs"])
    said = " ".join(result.stderr.split())  # the CLI's console is stderr (rich wraps lines)
    assert f"layout {manifest['layout']}: the fewest multiply-adds per rank among layouts sending no more than dense TP" in said
    assert f"hybrid {costs['hybrid']['macs'] / 1e6:.2f}M MACs, {costs['hybrid']['sent']:,.0f} sent" in said


@pytest.mark.parametrize("arch", ["deepseek_v3", "qwen3_next"])
def test_architectures_without_native_model_split_only_factors(arch, tucker_factory, tmp_path):
    """No native model: the Tucker factors are split by TuckerExperts' own rule, every
    other tensor (MLA / gated delta-net attention, shared experts) is replicated."""
    _, tucker = tucker_factory(arch)
    manifest = shard_checkpoint(tucker, 2, layout="hybrid", out=tmp_path / "s")
    splits = manifest["splits"]
    assert splits and all(".experts." in n for n in splits)
    assert {n.rsplit(".", 1)[1] for n in splits} == {"U_E", "U_H"}
    whole = _read_all(tucker)
    for r in range(2):
        got = _read_all(tmp_path / "s" / manifest["ranks"][r]["dir"])
        assert set(got) == set(whole)
        for name, t in whole.items():
            if name not in splits:
                assert torch.equal(got[name], t), name
            else:
                a, b = splits[name]["ranges"][r]
                assert torch.equal(got[name], t.narrow(splits[name]["axis"], a, b - a)), name


def test_layering_shard_imports_neither_torch_nn_nor_runtime():
    """The offline sharder and the bottom layer load without torch.nn or the runtime
    (the writer asks the runtime's layers only when it runs); the documented import
    ``from tuckerize.runtime import TuckerExperts`` works."""
    import subprocess
    import sys

    code = ("import sys, tuckerize.shard, tuckerize.parallel; "
            "print(sorted(m for m in ('torch', 'torch.nn', 'tuckerize.runtime') if m in sys.modules)); "
            "from tuckerize.runtime import TuckerExperts; from tuckerize.runtime.tucker_experts import TuckerExperts as T; "
            "print(TuckerExperts is T)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["[]", "True"], out


def test_unsharded_checkpoint_under_several_ranks_takes_the_shard_plan(tucker_factory):
    """An unsharded Tucker checkpoint opened by 2 ranks: the layout and load assignment that
    ``tuckerize shard`` would write (here the layout its rule picks; an explicit one is kept)."""
    from tuckerize.runtime.layout import choose_layout, layout_plan

    _, tucker = tucker_factory("qwen3_moe")
    source = TensorSource.open(tucker, parallel=ParallelContext(rank=1, world=2))
    assert source.layout == choose_layout(source.config, 2)[0]
    assert source.config["shard"]["layout"] == source.layout
    assert TensorSource.open(tucker, parallel=ParallelContext(rank=1, world=2), layout="intermediate").layout == "intermediate"
    assert TensorSource.open(tucker, parallel=ParallelContext()).layout == "intermediate"
    E = source.spec.num_experts
    layout, _, assignment = layout_plan(source.config, 2, "expert", load={L: [9.0] * 2 + [1.0] * (E - 2)
                                                                          for L in source.spec.moe_layers})
    assert layout == "expert" and all(a["assigned"] for a in assignment.values())


@pytest.mark.parametrize("layout", ["intermediate", "expert"])
def test_shard_bytes_against_source_and_bf16(tucker_factory, tmp_path, layout):
    """The shard manifest's ``bytes`` and the CLI's line: all ranks' expert tensors as written
    (read back from the rank files here) against the float32 source's experts and against
    bf16 dense experts, both counted from the source's tensor shapes."""
    src, tucker = tucker_factory("qwen3_moe")
    out = tmp_path / "s"
    result = cli("shard", str(tucker), "--tp", "2", "--layout", layout, "--out", str(out))
    assert result.exit_code == 0, result.output
    b = json.loads((out / SHARD_MANIFEST).read_text())["bytes"]
    written = [sum(t.numel() * t.element_size() for n, t in _read_all(out / f"rank-{r:05d}-of-00002").items()
                   if ".mlp.experts." in n) for r in range(2)]
    dense = [t for n, t in _read_all(src).items() if ".mlp.experts." in n]
    assert all(t.dtype == torch.float32 for t in dense)
    source = sum(t.numel() * 4 for t in dense)
    assert b["experts_stored_per_rank"] == written and b["experts_stored"] == sum(written)
    assert (b["experts_source"], b["experts_dense_bf16"]) == (source, source // 2)
    assert b["ratio_to_source"] == pytest.approx(sum(written) / source)
    assert b["ratio_to_bf16_dense"] == pytest.approx(2 * sum(written) / source)
    assert f"{b['ratio_to_source']:.1%} of the source's" in result.stderr.replace("\n", " ")

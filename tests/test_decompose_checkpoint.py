"""``tuckerize decompose`` end to end: library API and CLI, on tiny real-architecture checkpoints.

Reference values are computed here, independently of the library: expert weights
are read straight from the source safetensors with this file's own knowledge of
each architecture's tensor names, stacked to [E, H, I] (gate/up transposed), and
compared in float64 with the dense reconstruction from the written factors.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tiny_models
import torch
from cli_helpers import assert_cli_error
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import tuckerize.decompose as decompose_pkg
from tuckerize.compress import decompose_checkpoint
from tuckerize.errors import OutputConflictError, RankError

PROJ = ("gate", "up", "down")
FACTORS = ("U_E", "U_H", "U_I", "core")
LOW_RANKS = (3, 12, 6)  # every tiny model has E >= 4, H = 32, I >= 12

# ---------------------------------------------------------------- independent helpers


def read_cfg(folder: Path) -> dict:
    return json.loads((Path(folder) / "config.json").read_text())


def arch_of(cfg: dict) -> str:
    return cfg["model_type"]


def n_experts(cfg: dict) -> int:
    for key in ("num_experts", "num_local_experts", "n_routed_experts"):
        if cfg.get(key):
            return int(cfg[key])
    raise AssertionError("no expert count in config")


def shape_of(cfg: dict) -> tuple[int, int, int]:
    inter = cfg.get("moe_intermediate_size") or cfg["intermediate_size"]
    return n_experts(cfg), int(cfg["hidden_size"]), int(inter)


def moe_layers(cfg: dict) -> list[int]:
    n = int(cfg["num_hidden_layers"])
    if arch_of(cfg).startswith("deepseek"):
        return list(range(int(cfg["first_k_dense_replace"]), n))
    return list(range(n))


def experts_prefix(cfg: dict, layer: int) -> str:
    block = "block_sparse_moe" if arch_of(cfg) == "mixtral" else "mlp"
    return f"model.layers.{layer}.{block}.experts"


def disk_name(cfg: dict, layer: int, proj: str, expert: int) -> str:
    short = {"gate": "w1", "up": "w3", "down": "w2"}[proj] if arch_of(cfg) == "mixtral" else f"{proj}_proj"
    return f"{experts_prefix(cfg, layer)}.{expert}.{short}.weight"


EXPERT_RE = re.compile(r"\.experts\.(\d+\.|gate_up_proj$|down_proj$)")


def is_routed_expert(name: str) -> bool:
    return bool(EXPERT_RE.search(name))


def load_tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def source_stack(src: dict[str, torch.Tensor], cfg: dict, layer: int, proj: str) -> torch.Tensor:
    """[E, H, I] float64 from the source tensors (per-expert or fused layout)."""
    E, H, I = shape_of(cfg)
    prefix = experts_prefix(cfg, layer)
    if f"{prefix}.gate_up_proj" in src:
        if proj == "down":
            w = src[f"{prefix}.down_proj"]
            assert tuple(w.shape) == (E, H, I)
            return w.double()
        gu = src[f"{prefix}.gate_up_proj"]
        assert tuple(gu.shape) == (E, 2 * I, H)
        half = gu[:, :I] if proj == "gate" else gu[:, I:]
        return half.transpose(1, 2).double()
    mats = []
    for e in range(E):
        w = src[disk_name(cfg, layer, proj, e)]
        assert tuple(w.shape) == ((H, I) if proj == "down" else (I, H))
        mats.append(w.double() if proj == "down" else w.double().T)
    return torch.stack(mats)


def reconstruct(out: dict[str, torch.Tensor], cfg: dict, layer: int, proj: str) -> torch.Tensor:
    p = f"{experts_prefix(cfg, layer)}.{proj}"
    f = {name: out[f"{p}.{name}"] for name in FACTORS}
    for name in FACTORS:
        assert f[name].dtype == torch.float32
    return torch.einsum("abc,ea,hb,ic->ehi", *(f[n].double() for n in ("core", "U_E", "U_H", "U_I")))


def rel_err(ref: torch.Tensor, approx: torch.Tensor) -> float:
    return float(torch.linalg.norm(ref - approx) / torch.linalg.norm(ref))


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))
    )


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def snapshot(folder: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under ``folder``."""
    return {str(p.relative_to(folder)): sha256(p) for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def manifest_entry(manifest: dict, layer: int, proj: str) -> dict:
    hits = [t for t in manifest["tensors"] if t["layer"] == layer and t["projection"] == proj]
    assert len(hits) == 1, (layer, proj)
    return hits[0]


def run(src: Path, out: Path, ranks=LOW_RANKS, **kwargs) -> dict:
    ranks = ",".join(map(str, ranks)) if isinstance(ranks, tuple) else ranks
    return decompose_checkpoint(str(src), out, ranks=ranks, **kwargs)


def check_factors_against_source(src_folder: Path, out_folder: Path, manifest: dict, ranks=None) -> list[float]:
    """Reconstruction error of every MoE layer/projection equals the manifest's; returns them."""
    cfg = read_cfg(src_folder)
    src, out = load_tensors(src_folder), load_tensors(out_folder)
    E, H, I = shape_of(cfg)
    errors = []
    for layer in moe_layers(cfg):
        for proj in PROJ:
            ref = source_stack(src, cfg, layer, proj)
            entry = manifest_entry(manifest, layer, proj)
            rE, rH, rI = entry["ranks"] if ranks is None else ranks
            p = f"{experts_prefix(cfg, layer)}.{proj}"
            assert tuple(out[f"{p}.U_E"].shape) == (E, rE)
            assert tuple(out[f"{p}.U_H"].shape) == (H, rH)
            assert tuple(out[f"{p}.U_I"].shape) == (I, rI)
            assert tuple(out[f"{p}.core"].shape) == (rE, rH, rI)
            err = rel_err(ref, reconstruct(out, cfg, layer, proj))
            assert entry["relative_error"] == pytest.approx(err, rel=1e-4, abs=1e-6), (layer, proj)
            lo, hi = hosvd_error_bounds(ref, (rE, rH, rI))
            assert lo * (1 - 1e-4) - 1e-6 <= err <= hi * (1 + 1e-4) + 1e-6, (layer, proj, lo, err, hi)
            errors.append(err)
    return errors


def hosvd_error_bounds(ref: torch.Tensor, ranks) -> tuple[float, float]:
    """Relative-error bounds of a rank-``ranks`` Tucker model of ``ref`` from the singular
    values of its unfoldings (float64): no model beats the worst single-mode truncation
    (lower), and ST-HOSVD (HOOI only improves on it) is within the sum of all modes'
    discarded energy (upper)."""
    energy = float(ref.square().sum())
    tails = []
    for n, r in enumerate(ranks):
        s = torch.linalg.svdvals(ref.movedim(n, 0).reshape(ref.shape[n], -1))
        tails.append(float(s[r:].square().sum()) / energy)
    return max(tails) ** 0.5, sum(tails) ** 0.5


# ---------------------------------------------------------------- one decomposition per architecture


@pytest.fixture(scope="session")
def decomposed(moe_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "tucker"
    manifest = run(moe_ckpt, out)
    return moe_ckpt, out, manifest


def test_factors_reconstruct_source_experts(decomposed):
    src, out, manifest = decomposed
    errors = check_factors_against_source(src, out, manifest, ranks=LOW_RANKS)
    cfg = read_cfg(src)
    assert len(errors) == 3 * len(moe_layers(cfg))
    # Random expert weights at low ranks: a real, large error (not a trivially exact fit);
    # each error is also within the HOSVD bounds (check_factors_against_source).
    assert all(e > 0.2 for e in errors)


def test_full_ranks_are_exact(moe_ckpt, tmp_path):
    cfg = read_cfg(moe_ckpt)
    manifest = run(moe_ckpt, tmp_path / "full", ranks=shape_of(cfg))
    errors = check_factors_against_source(moe_ckpt, tmp_path / "full", manifest, ranks=shape_of(cfg))
    assert max(errors) < 1e-5
    assert max(t["relative_error"] for t in manifest["tensors"]) < 1e-5


def test_output_tensors(decomposed):
    src_folder, out_folder, manifest = decomposed
    cfg = read_cfg(src_folder)
    src, out = load_tensors(src_folder), load_tensors(out_folder)
    kept = {n for n in src if not is_routed_expert(n)}
    assert len(kept) < len(src)  # the source does have routed experts
    factors = {f"{experts_prefix(cfg, layer)}.{p}.{f}" for layer in moe_layers(cfg) for p in PROJ for f in FACTORS}
    assert set(out) == kept | factors
    assert not [n for n in out if is_routed_expert(n)]
    for name in kept:
        assert same_bytes(src[name], out[name]), name
    # The router of every MoE layer is kept (its name also contains "gate").
    for layer in moe_layers(cfg):
        router = experts_prefix(cfg, layer).rsplit(".", 1)[0] + ".gate.weight"
        assert router in out and same_bytes(src[router], out[router])


def test_output_index_config_and_side_files(decomposed):
    src_folder, out_folder, manifest = decomposed
    index = json.loads((out_folder / "model.safetensors.index.json").read_text())
    weight_map = index["weight_map"]
    on_disk: dict[str, str] = {}
    for f in sorted(out_folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            for name in h.keys():
                assert name not in on_disk, f"{name} written twice"
                on_disk[name] = f.name
    assert weight_map == on_disk
    assert index["metadata"]["total_size"] == sum(f.stat().st_size for f in out_folder.glob("*.safetensors"))

    src_cfg, out_cfg = read_cfg(src_folder), read_cfg(out_folder)
    assert set(out_cfg) == set(src_cfg) | {"tucker"}
    for key, value in src_cfg.items():
        if key not in ("architectures", "model_type"):
            assert out_cfg[key] == value, key
    # Renamed so that stock vLLM / transformers refuse the checkpoint; originals recorded.
    assert out_cfg["architectures"] == ["Tuckerize" + a for a in src_cfg["architectures"]]
    assert out_cfg["model_type"] == "tuckerize_" + src_cfg["model_type"]
    tucker_cfg = out_cfg["tucker"]
    assert tucker_cfg["original"] == {"architectures": src_cfg["architectures"], "model_type": src_cfg["model_type"]}
    E, H, I = shape_of(src_cfg)
    assert sorted(int(k) for k in tucker_cfg["layers"]) == moe_layers(src_cfg)
    for layer_info in tucker_cfg["layers"].values():
        for p in PROJ:
            assert layer_info[p]["ranks"] == list(LOW_RANKS)
            assert layer_info[p]["shape"] == [E, H, I]

    for name in tiny_models.SIDE_FILES:
        assert (out_folder / name).read_bytes() == (src_folder / name).read_bytes()
    assert (out_folder / "generation_config.json").read_bytes() == (src_folder / "generation_config.json").read_bytes()
    leftovers = [p.name for p in out_folder.iterdir() if p.name.startswith(".")]
    assert leftovers == [], "journal or temporary files left in a finished checkpoint"


def test_manifest(decomposed):
    src_folder, out_folder, manifest = decomposed
    cfg = read_cfg(src_folder)
    E, H, I = shape_of(cfg)
    layers = moe_layers(cfg)
    assert json.loads((out_folder / "tuckerize_manifest.json").read_text()) == json.loads(json.dumps(manifest))
    assert manifest["source"]["files_sha256"] == {"model.safetensors": sha256(src_folder / "model.safetensors")}
    assert manifest["source"]["hub_id"] is None
    assert Path(manifest["source"]["path"]) == src_folder.resolve()
    assert manifest["architecture"] == arch_of(cfg)
    assert manifest["moe"]["layers"] == layers
    assert (manifest["moe"]["experts"], manifest["moe"]["hidden"], manifest["moe"]["intermediate"]) == (E, H, I)

    src, out = load_tensors(src_folder), load_tensors(out_folder)
    factor_numel = sum(t.numel() for n, t in out.items() if n.split(".")[-1] in FACTORS and ".experts." in n)
    params = manifest["params"]
    assert params["experts_before"] == 3 * E * H * I * len(layers)
    assert params["experts_before"] == sum(t.numel() for n, t in src.items() if is_routed_expert(n))
    assert params["experts_after"] == factor_numel
    rE, rH, rI = LOW_RANKS
    assert factor_numel == 3 * len(layers) * (E * rE + H * rH + I * rI + rE * rH * rI)
    assert params["experts_ratio"] == pytest.approx(factor_numel / params["experts_before"])
    assert params["model_before"] == sum(t.numel() for t in src.values())
    assert params["model_after"] == sum(t.numel() for t in out.values())

    assert len(manifest["tensors"]) == 3 * len(layers)
    for t in manifest["tensors"]:
        assert t["ranks"] == list(LOW_RANKS)
        assert t["relative_error"] > 0
        assert t["error_history"][-1] == t["relative_error"]
        assert t["params"] == E * rE + H * rH + I * rI + rE * rH * rI
    for name, entry in manifest["files"].items():
        assert entry["sha256"] == sha256(out_folder / name)
        assert entry["bytes"] == (out_folder / name).stat().st_size


# ---------------------------------------------------------------- dtypes and layouts


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_sources(tiny_factory, tmp_path, dtype):
    src_folder = tiny_factory("qwen3_moe", dtype=dtype)
    src = load_tensors(src_folder)
    assert src["model.layers.0.mlp.experts.0.up_proj.weight"].dtype == dtype
    manifest = run(src_folder, tmp_path / "low", factor_dtype="float32")  # the default, the source's: tests/decompose
    errors = check_factors_against_source(src_folder, tmp_path / "low", manifest)
    assert all(e > 0.2 for e in errors)  # and within the HOSVD bounds (check_factors_against_source)
    out = load_tensors(tmp_path / "low")
    for name, tensor in src.items():
        if not is_routed_expert(name):
            assert same_bytes(tensor, out[name]), name
    # Full ranks: exact with respect to the half-precision values (float32 holds them exactly).
    cfg = read_cfg(src_folder)
    manifest = run(src_folder, tmp_path / "full", ranks=shape_of(cfg), factor_dtype="float32")
    assert max(check_factors_against_source(src_folder, tmp_path / "full", manifest)) < 1e-5


def test_fused_layout_equals_per_expert_layout(fused_pair, tmp_path):
    fused, per_expert = fused_pair
    src_fused, src_split = load_tensors(fused), load_tensors(per_expert)
    assert "model.layers.0.mlp.experts.gate_up_proj" in src_fused
    assert "model.layers.0.mlp.experts.0.gate_proj.weight" in src_split
    cfg = read_cfg(fused)
    for layer in moe_layers(cfg):  # the two sources really hold the same experts
        for p in PROJ:
            assert torch.equal(source_stack(src_fused, cfg, layer, p), source_stack(src_split, cfg, layer, p))

    ranks = (3, 10, 5)
    m_fused = run(fused, tmp_path / "fused", ranks=ranks)
    m_split = run(per_expert, tmp_path / "split", ranks=ranks)
    check_factors_against_source(fused, tmp_path / "fused", m_fused, ranks=ranks)
    out_fused, out_split = load_tensors(tmp_path / "fused"), load_tensors(tmp_path / "split")
    assert set(out_fused) == set(out_split)
    for name in out_fused:
        if name.split(".")[-1] in FACTORS:
            # Same values; only BLAS summation order may differ (memory-mapped vs copied input).
            assert rel_err(out_split[name].double(), out_fused[name].double()) < 1e-5, name
        else:
            assert same_bytes(out_fused[name], out_split[name]), name
    for a, b in zip(m_fused["tensors"], m_split["tensors"]):
        assert a["relative_error"] == pytest.approx(b["relative_error"], rel=1e-6)
    assert m_fused["params"]["experts_after"] == m_split["params"]["experts_after"]
    assert m_fused["params"]["experts_before"] == m_split["params"]["experts_before"]


# ---------------------------------------------------------------- architecture specifics


@pytest.mark.parametrize("arch", ["deepseek_v2", "deepseek_v3"])
def test_deepseek_dense_layer_and_shared_experts_stay_dense(tiny_factory, tmp_path, arch):
    src_folder = tiny_factory(arch)
    manifest = run(src_folder, tmp_path / "out")
    src, out = load_tensors(src_folder), load_tensors(tmp_path / "out")
    assert manifest["moe"]["layers"] == [1, 2]
    assert sorted(read_cfg(tmp_path / "out")["tucker"]["layers"]) == ["1", "2"]
    for p in PROJ:
        name = f"model.layers.0.mlp.{p}_proj.weight"
        assert same_bytes(src[name], out[name])
        for layer in (1, 2):
            shared = f"model.layers.{layer}.mlp.shared_experts.{p}_proj.weight"
            assert same_bytes(src[shared], out[shared])
    assert not [n for n in out if n.startswith("model.layers.0.") and ".experts." in n]
    assert not [n for n in out if ".shared_experts." in n and n.split(".")[-1] in FACTORS]


@pytest.mark.parametrize("arch", ["qwen2_moe", "qwen3_next"])
def test_qwen_shared_expert_and_its_gate_are_kept(tiny_factory, tmp_path, arch):
    src_folder = tiny_factory(arch)
    run(src_folder, tmp_path / "out")
    src, out = load_tensors(src_folder), load_tensors(tmp_path / "out")
    for layer in moe_layers(read_cfg(src_folder)):
        names = [f"model.layers.{layer}.mlp.shared_expert.{p}_proj.weight" for p in PROJ]
        names.append(f"model.layers.{layer}.mlp.shared_expert_gate.weight")
        for name in names:
            assert same_bytes(src[name], out[name]), name


def test_rank_plan_from_yaml(qwen3_ckpt, tmp_path):
    plan = tmp_path / "plan.yaml"
    plan.write_text("ranks: [2, 8, 4]\nprojections:\n  down: [3, 10, 5]\nlayers:\n  1:\n    gate: [4, 16, 8]\n")
    manifest = decompose_checkpoint(str(qwen3_ckpt), tmp_path / "out", config=plan)
    want = {(0, "gate"): [2, 8, 4], (0, "up"): [2, 8, 4], (0, "down"): [3, 10, 5],
            (1, "gate"): [4, 16, 8], (1, "up"): [2, 8, 4], (1, "down"): [3, 10, 5]}
    for (layer, p), r in want.items():
        assert manifest_entry(manifest, layer, p)["ranks"] == r
        assert read_cfg(tmp_path / "out")["tucker"]["layers"][str(layer)][p]["ranks"] == r
    check_factors_against_source(qwen3_ckpt, tmp_path / "out", manifest)
    assert manifest["rank_plan"]["layers"] == {"1": {"gate": [4, 16, 8]}}


def test_hooi_iterations_do_not_increase_error(qwen3_ckpt, tmp_path):
    base = run(qwen3_ckpt, tmp_path / "hosvd")
    hooi = run(qwen3_ckpt, tmp_path / "hooi", iters=3, tol=0.0)
    assert hooi["settings"]["algorithm"] == "st-hosvd+hooi" and base["settings"]["algorithm"] == "st-hosvd"
    check_factors_against_source(qwen3_ckpt, tmp_path / "hooi", hooi)
    for a, b in zip(base["tensors"], hooi["tensors"]):
        assert b["relative_error"] <= a["relative_error"] * (1 + 1e-6)
        assert len(b["error_history"]) > 1


def test_default_output_folder(qwen3_ckpt, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    manifest = decompose_checkpoint(str(qwen3_ckpt), ranks="2,8,4")
    expected = tmp_path / f"{qwen3_ckpt.name}-tucker-2-8-4"
    assert Path(manifest["out"]) == expected
    assert (expected / "tuckerize_manifest.json").is_file()


# ---------------------------------------------------------------- resume and output folder rules


class Counter:
    """Wraps the engine that compress.py imports at call time (``from tuckerize.decompose import tucker``)."""

    def __init__(self, monkeypatch, fail_on: int | None = None):
        self.calls = 0
        self.fail_on = fail_on
        real = decompose_pkg.tucker

        def wrapper(*args, **kwargs):
            self.calls += 1
            if self.fail_on is not None and self.calls == self.fail_on:
                raise RuntimeError("simulated crash")
            return real(*args, **kwargs)

        monkeypatch.setattr(decompose_pkg, "tucker", wrapper)


def unit_files(folder: Path) -> dict[str, str]:
    return {p.name: sha256(p) for p in sorted(folder.glob("*.safetensors"))}


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, tiny_factory):
    """An uninterrupted qwen3_moe decomposition (2 MoE layers, units 0-2)."""
    src = tiny_factory("qwen3_moe")
    out = tmp_path_factory.mktemp("ref") / "out"
    return src, out, run(src, out)


def unit_contents(folder: Path) -> dict[str, tuple[dict, bytes]]:
    """File -> (parsed header, data bytes). Equal up to the order of header keys:
    safetensors writes ``__metadata__`` in hash-map order, which varies between runs."""
    out = {}
    for p in sorted(folder.glob("*.safetensors")):
        raw = p.read_bytes()
        n = int.from_bytes(raw[:8], "little")
        out[p.name] = (json.loads(raw[8 : 8 + n]), raw[8 + n :])
    return out


def assert_same_checkpoint(a: Path, b: Path):
    ua, ub = unit_contents(a), unit_contents(b)
    assert set(ua) == set(ub)
    for name in ua:
        assert ua[name][0] == ub[name][0], name  # same tensors, dtypes, shapes, offsets, metadata
        assert ua[name][1] == ub[name][1], name  # same tensor bytes
    for name in ("model.safetensors.index.json", "config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    ma = json.loads((a / "tuckerize_manifest.json").read_text())
    mb = json.loads((b / "tuckerize_manifest.json").read_text())
    strip = lambda ts: [{k: v for k, v in t.items() if k != "seconds"} for t in ts]  # noqa: E731
    assert strip(ma["tensors"]) == strip(mb["tensors"])
    assert ma["params"] == mb["params"] and ma["fingerprint"] == mb["fingerprint"]


def test_resume_after_crash(reference_run, tmp_path, monkeypatch):
    src, ref_out, _ = reference_run
    out = tmp_path / "out"
    crash = Counter(monkeypatch, fail_on=4)  # layer 0 (calls 1-3) completes, layer 1 crashes
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(src, out)
    assert crash.calls == 4
    assert not (out / "tuckerize_manifest.json").exists()
    assert (out / ".tuckerize-journal.json").is_file()
    assert not (out / "model.safetensors.index.json").exists()
    assert set(unit_files(out)) == {"model-00000-of-00003.safetensors", "model-00001-of-00003.safetensors"}
    assert not [p for p in out.iterdir() if ".tmp" in p.name]
    layer0 = unit_files(out)["model-00001-of-00003.safetensors"]

    again = Counter(monkeypatch)
    manifest = run(src, out)
    assert again.calls == 3  # only layer 1 was decomposed
    assert unit_files(out)["model-00001-of-00003.safetensors"] == layer0
    assert not (out / ".tuckerize-journal.json").exists()
    assert_same_checkpoint(out, ref_out)
    check_factors_against_source(src, out, manifest)


def test_rerun_finished_skips_and_repairs(reference_run, tmp_path, monkeypatch):
    src, ref_out, _ = reference_run
    out = tmp_path / "out"
    shutil.copytree(ref_out, out)
    counter = Counter(monkeypatch)
    run(src, out)
    assert counter.calls == 0
    assert_same_checkpoint(out, ref_out)

    # A deleted MoE unit and a damaged non-MoE unit are redone; the rest is kept.
    (out / "model-00002-of-00003.safetensors").unlink()
    unit0 = out / "model-00000-of-00003.safetensors"
    data = bytearray(unit0.read_bytes())
    data[-1] ^= 0xFF
    unit0.write_bytes(bytes(data))
    counter.calls = 0
    run(src, out)
    assert counter.calls == 3
    assert_same_checkpoint(out, ref_out)


def test_overwrite_starts_over(reference_run, tmp_path, monkeypatch):
    src, ref_out, _ = reference_run
    out = tmp_path / "out"
    shutil.copytree(ref_out, out)
    counter = Counter(monkeypatch)
    run(src, out, overwrite=True)
    assert counter.calls == 6
    assert_same_checkpoint(out, ref_out)


def test_folder_with_unrelated_files_is_refused(qwen3_ckpt, tmp_path, monkeypatch):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    (out / "sub").mkdir()
    (out / "sub" / "model.safetensors").write_bytes(b"not ours")
    before = snapshot(out)
    counter = Counter(monkeypatch)
    for overwrite in (False, True):
        with pytest.raises(OutputConflictError, match="not a tuckerize checkpoint"):
            run(qwen3_ckpt, out, overwrite=overwrite)
    assert snapshot(out) == before
    assert counter.calls == 0


def test_output_path_is_a_file(qwen3_ckpt, tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(OutputConflictError, match="is a file"):
        run(qwen3_ckpt, target)
    assert target.read_text() == "x"


def test_empty_existing_folder_is_used(qwen3_ckpt, tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    run(qwen3_ckpt, out, ranks=(2, 8, 4))
    assert (out / "tuckerize_manifest.json").is_file()


def test_other_ranks_need_overwrite(reference_run, tmp_path, monkeypatch):
    src, ref_out, _ = reference_run
    out = tmp_path / "out"
    shutil.copytree(ref_out, out)
    before = snapshot(out)
    counter = Counter(monkeypatch)
    with pytest.raises(OutputConflictError, match="--overwrite"):
        run(src, out, ranks=(2, 8, 4))
    with pytest.raises(OutputConflictError, match="--overwrite"):
        run(src, out, iters=2)  # other settings, same ranks
    assert snapshot(out) == before and counter.calls == 0
    manifest = run(src, out, ranks=(2, 8, 4), overwrite=True)
    assert counter.calls == 6
    assert all(t["ranks"] == [2, 8, 4] for t in manifest["tensors"])
    check_factors_against_source(src, out, manifest)


def test_interrupted_folder_with_other_ranks_is_refused(qwen3_ckpt, tmp_path, monkeypatch):
    out = tmp_path / "out"
    Counter(monkeypatch, fail_on=4)
    with pytest.raises(RuntimeError):
        run(qwen3_ckpt, out)
    before = snapshot(out)
    with pytest.raises(OutputConflictError):
        run(qwen3_ckpt, out, ranks=(2, 8, 4))
    assert snapshot(out) == before


def test_library_errors_leave_no_manifest(qwen3_ckpt, tmp_path):
    with pytest.raises(RankError, match="exactly one"):
        decompose_checkpoint(str(qwen3_ckpt), tmp_path / "a")
    (tmp_path / "p.yaml").write_text("ranks: [2, 2, 2]\n")
    with pytest.raises(RankError, match="exactly one"):
        decompose_checkpoint(str(qwen3_ckpt), tmp_path / "a", ranks="2,2,2", config=tmp_path / "p.yaml")
    with pytest.raises(RankError, match="q.yaml does not exist"):
        decompose_checkpoint(str(qwen3_ckpt), tmp_path / "a", ranks="2,2,2", config=tmp_path / "q.yaml")
    with pytest.raises(RankError, match="negative"):
        run(qwen3_ckpt, tmp_path / "a", iters=-1)
    with pytest.raises(RankError, match="r_E=9"):
        run(qwen3_ckpt, tmp_path / "a", ranks=(9, 8, 4))
    assert not (tmp_path / "a").exists()


# ---------------------------------------------------------------- hub cache, offline


def fill_hub_cache(cache: Path, repo_id: str, src: Path) -> tuple[str, Path]:
    """The standard huggingface_hub cache layout: blobs, snapshot symlinks, refs/main."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for f in sorted(src.iterdir()):
        blob = repo / "blobs" / sha256(f)
        shutil.copyfile(f, blob)
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return commit, snap


def offline_env(monkeypatch, hf_home: Path) -> None:
    import huggingface_hub.constants as constants

    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setenv("HF_HUB_CACHE", str(hf_home / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads these at import time.
    monkeypatch.setattr(constants, "HF_HOME", str(hf_home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hf_home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def test_hub_id_from_offline_cache(reference_run, tmp_path, monkeypatch):
    src, ref_out, _ = reference_run
    hf_home = tmp_path / "hf"
    commit, snap = fill_hub_cache(hf_home / "hub", "tiny-org/tiny-qwen3", src)
    offline_env(monkeypatch, hf_home)
    monkeypatch.chdir(tmp_path)
    manifest = decompose_checkpoint("tiny-org/tiny-qwen3", tmp_path / "out", ranks="3,12,6")
    assert manifest["source"]["hub_id"] == "tiny-org/tiny-qwen3"
    assert manifest["source"]["model"] == "tiny-org/tiny-qwen3"
    assert Path(manifest["source"]["path"]).resolve() == snap.resolve()
    assert manifest["source"]["files_sha256"] == {"model.safetensors": sha256(src / "model.safetensors")}
    assert_same_checkpoint(tmp_path / "out", ref_out)  # same source bytes, same result
    # A pinned revision (the commit) resolves to the same snapshot.
    manifest = decompose_checkpoint("tiny-org/tiny-qwen3", tmp_path / "out2", ranks="3,12,6", revision=commit)
    assert manifest["source"]["revision"] == commit
    assert Path(manifest["source"]["path"]).resolve() == snap.resolve()


# ---------------------------------------------------------------- CLI


def cli(*args: str, env: dict | None = None):
    from typer.testing import CliRunner

    from tuckerize.cli import app

    return CliRunner().invoke(app, list(args), env=env)


def test_cli_success_json(qwen3_ckpt, tmp_path):
    result = cli("decompose", "--model", str(qwen3_ckpt), "--ranks", "3,12,6", "--out", str(tmp_path / "o"), "--json")
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    assert printed == json.loads((tmp_path / "o" / "tuckerize_manifest.json").read_text())
    check_factors_against_source(qwen3_ckpt, tmp_path / "o", printed, ranks=LOW_RANKS)


def test_cli_success_table(qwen3_ckpt, tmp_path):
    result = cli("decompose", "-m", str(qwen3_ckpt), "--ranks", "2,8,4", "--out", str(tmp_path / "o"))
    assert result.exit_code == 0, result.output
    assert f"written to {tmp_path / 'o'}" in result.stderr.replace("\n", "")
    assert (tmp_path / "o" / "tuckerize_manifest.json").is_file()


def test_cli_missing_folder(tmp_path):
    missing = tmp_path / "no" / "such"
    assert_cli_error(cli("decompose", "--model", str(missing), "--ranks", "2,8,4", "--out", str(tmp_path / "o")),
                     str(missing), "does not exist")
    assert not (tmp_path / "o").exists()


def test_cli_hub_id_not_cached(tmp_path):
    """Real process, real environment: HF_HUB_OFFLINE=1 and an empty HF_HOME."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE", "TUCKERIZE"))}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1")
    (tmp_path / "hf").mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "tuckerize", "decompose", "--model", "nobody/not-cached", "--ranks", "2,8,4",
         "--out", str(tmp_path / "o")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "nobody/not-cached" in lines[0] and "cache" in lines[0]
    assert proc.stdout == ""


def test_cli_truncated_safetensors(qwen3_ckpt, copy_ckpt, tmp_path):
    src = copy_ckpt(qwen3_ckpt)
    path = src / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert_cli_error(cli("decompose", "-m", str(src), "--ranks", "2,8,4", "--out", str(tmp_path / "o")),
                     "model.safetensors", "truncated")


def test_cli_truncated_shard_of_indexed_checkpoint(tiny_factory, copy_ckpt, tmp_path):
    """A sharded checkpoint (index + several files) with one shard cut short."""
    src = copy_ckpt(tiny_factory("qwen3_moe"), "sharded")
    tensors = load_file(str(src / "model.safetensors"))
    (src / "model.safetensors").unlink()
    names = sorted(tensors)
    half = len(names) // 2
    files = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    for fname, part in files.items():
        save_file({n: tensors[n] for n in part}, str(src / fname), metadata={"format": "pt"})
    (src / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {n: f for f, part in files.items() for n in part}}))
    # Sanity: the sharded checkpoint itself works and gives the same factors.
    manifest = run(src, tmp_path / "ok")
    check_factors_against_source(src, tmp_path / "ok", manifest, ranks=LOW_RANKS)
    victim = src / "model-00002-of-00002.safetensors"
    victim.write_bytes(victim.read_bytes()[:-100])
    assert_cli_error(cli("decompose", "-m", str(src), "--ranks", "2,8,4", "--out", str(tmp_path / "o")),
                     "model-00002-of-00002.safetensors")
    assert not (tmp_path / "o" / "tuckerize_manifest.json").exists()


def test_cli_missing_shard(tiny_factory, copy_ckpt, tmp_path):
    src = copy_ckpt(tiny_factory("qwen3_moe"), "noshard")
    names = list(load_file(str(src / "model.safetensors")))
    (src / "model.safetensors").rename(src / "model-00001-of-00002.safetensors")
    weight_map = {n: "model-00001-of-00002.safetensors" for n in names}
    weight_map[names[0]] = "model-00002-of-00002.safetensors"
    (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert_cli_error(cli("decompose", "-m", str(src), "--ranks", "2,8,4", "--out", str(tmp_path / "o")),
                     "model-00002-of-00002.safetensors", "missing")


NAN_TENSOR = "model.layers.1.mlp.experts.2.up_proj.weight"


@pytest.fixture
def nan_ckpt(qwen3_ckpt, copy_ckpt):
    src = copy_ckpt(qwen3_ckpt, "nan")
    tensors = load_file(str(src / "model.safetensors"))
    tensors[NAN_TENSOR][3, 4] = float("nan")
    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
    return src


def test_cli_nan_in_expert(nan_ckpt, tmp_path):
    assert_cli_error(cli("decompose", "-m", str(nan_ckpt), "--ranks", "2,8,4", "--out", str(tmp_path / "o")),
                     NAN_TENSOR, "NaN")
    assert not (tmp_path / "o" / "tuckerize_manifest.json").exists()


def test_cli_nan_in_expert_real_process(nan_ckpt, tmp_path):
    """As a user sees it: progress bars were on screen when the error came; stderr is one line."""
    env = {k: v for k, v in os.environ.items() if k != "TUCKERIZE_DEBUG"}
    proc = subprocess.run(
        [sys.executable, "-m", "tuckerize", "decompose", "-m", str(nan_ckpt), "--ranks", "2,8,4",
         "--out", str(tmp_path / "o")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 1
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and NAN_TENSOR in lines[0], proc.stderr
    assert proc.stdout == ""


@pytest.mark.parametrize(
    "ranks,fragments",
    [
        ("9,8,4", ["r_E=9", "number of experts is 8", "1..8"]),
        ("2,33,4", ["r_H=33", "hidden size is 32"]),
        ("2,8,17", ["r_I=17", "intermediate size is 16"]),
        ("0,8,4", ["r_E=0"]),
        ("2,8", ["malformed", "64,512,256"]),
        ("2,x,4", ["r_H", "not a whole number"]),
    ],
)
def test_cli_bad_ranks(qwen3_ckpt, tmp_path, ranks, fragments):
    assert_cli_error(cli("decompose", "-m", str(qwen3_ckpt), "--ranks", ranks, "--out", str(tmp_path / "o")),
                     *fragments)
    assert not (tmp_path / "o").exists()


def test_cli_ranks_and_config_exclusive(qwen3_ckpt, tmp_path):
    plan = tmp_path / "p.yaml"
    plan.write_text("ranks: [2, 8, 4]\n")
    assert_cli_error(cli("decompose", "-m", str(qwen3_ckpt), "--out", str(tmp_path / "o")), "--ranks", "--config")
    assert_cli_error(cli("decompose", "-m", str(qwen3_ckpt), "--ranks", "2,8,4", "--config", str(plan),
                         "--out", str(tmp_path / "o")), "exactly one")


def test_cli_config_with_stray_layer(qwen3_ckpt, tmp_path):
    plan = tmp_path / "p.yaml"
    plan.write_text("ranks: [2, 8, 4]\nlayers:\n  5: [1, 1, 1]\n")
    assert_cli_error(cli("decompose", "-m", str(qwen3_ckpt), "--config", str(plan), "--out", str(tmp_path / "o")),
                     "layer 5", "not a MoE layer", "0-1")


def test_cli_unsupported_architecture(tiny_factory, tmp_path):
    line = assert_cli_error(
        cli("decompose", "-m", str(tiny_factory("llama")), "--ranks", "2,8,4", "--out", str(tmp_path / "o")),
        "LlamaForCausalLM", "not supported")
    for cls in ("Qwen3MoeForCausalLM", "Qwen3NextForCausalLM", "Qwen2MoeForCausalLM", "MixtralForCausalLM",
                "DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM", "OlmoeForCausalLM"):
        assert cls in line


def test_cli_output_conflict(qwen3_ckpt, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert_cli_error(cli("decompose", "-m", str(qwen3_ckpt), "--ranks", "2,8,4", "--out", str(out)),
                     str(out), "not a tuckerize checkpoint")
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


def test_cli_interrupt_says_how_to_resume(qwen3_ckpt, tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(decompose_pkg, "tucker", interrupted)
    result = cli("decompose", "-m", str(qwen3_ckpt), "--ranks", "2,8,4", "--out", str(tmp_path / "o"))
    assert result.exit_code == 130
    assert result.stderr.strip().splitlines() == ["interrupted; rerun the same command to resume"]


def test_help_does_not_import_torch():
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from tuckerize.cli import app\n"
        "r = CliRunner().invoke(app, ['--help'])\n"
        "assert r.exit_code == 0 and 'decompose' in r.output, r.output\n"
        "r = CliRunner().invoke(app, ['decompose', '--help'])\n"
        "assert r.exit_code == 0 and '--ranks' in r.output, r.output\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'tensorly')))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
    # The installed entry point too, measured by the interpreter's own import log.
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "tuckerize", "--help"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "decompose" in proc.stdout
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert "tuckerize.cli" in imported
    assert not {m for m in imported if m.split(".")[0] in ("torch", "transformers", "tensorly")}

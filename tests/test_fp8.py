"""FP8 checkpoints: dequantisation on read, decomposition end to end, the native runtime.

Small FP8 checkpoints are made from tiny transformers models (``model_refs.build_random``)
by a quantiser written here, in two layouts: block FP8 as DeepSeek-V3 and Qwen's -FP8
releases store it (``X.weight`` e4m3 + ``X.weight_scale_inv`` per block, partial blocks
at the edges) and compressed-tensors (``X.weight_scale`` per output channel, plus
``X.input_scale``). The reference for every dequantised value is a float64 loop over
blocks in numpy; the runtime's reference is transformers' own model of a float32
checkpoint holding those reference values.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import model_refs as M
import tiny_models
import tucker_refs as R
from tuckerize.errors import InputError

FP8_MAX = 448.0
#: Block size of the tiny block-FP8 checkpoints: 16 x 12 leaves partial blocks at the edge
#: of every hidden-size (32) axis.
BLOCK = (16, 12)
BLOCK_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": list(BLOCK),
                "activation_scheme": "dynamic"}
CT_CONFIG = {
    "quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
    "config_groups": {"group_0": {
        "targets": ["Linear"],
        "weights": {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True, "dynamic": False},
        "input_activations": {"num_bits": 8, "type": "float", "strategy": "tensor", "symmetric": True,
                              "dynamic": False},
    }},
    "ignore": ["lm_head", "re:.*mlp.gate$"],
}


# ----------------------------------------------------------------------------- references


def quantised(name: str, t: torch.Tensor) -> bool:
    """Which tensors the FP8 releases quantise: every linear projection weight (attention,
    experts, shared experts, dense MLP); not embeddings, norms, routers or the LM head."""
    return t.ndim == 2 and name.endswith("_proj.weight")


def quantise_block(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3 weight and float32 scale per block (amax / 448), by loops over the blocks."""
    O, I = w.shape
    b0, b1 = block
    grid = (-(-O // b0), -(-I // b1))
    scale = torch.empty(grid, dtype=torch.float32)
    q = torch.empty((O, I), dtype=torch.float8_e4m3fn)
    for a in range(grid[0]):
        for b in range(grid[1]):
            blk = w[a * b0 : (a + 1) * b0, b * b1 : (b + 1) * b1].double()
            s = float(blk.abs().max()) / FP8_MAX
            scale[a, b] = s
            q[a * b0 : (a + 1) * b0, b * b1 : (b + 1) * b1] = (blk / scale[a, b].double()).to(torch.float8_e4m3fn)
    return q, scale


def dequantise_ref(q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] | None) -> np.ndarray:
    """float64 numpy: per block (``block``), per output channel ([O, 1]) or per tensor."""
    v = q.float().numpy().astype(np.float64)  # every e4m3 value is exact in float32
    s = scale.float().numpy().astype(np.float64)
    out = np.empty_like(v)
    O, I = v.shape
    if s.size == 1:
        return v * s.reshape(())
    if s.shape == (O, 1):
        for o in range(O):
            out[o] = v[o] * s[o, 0]
        return out
    b0, b1 = block
    for a in range(s.shape[0]):
        for b in range(s.shape[1]):
            rows, cols = slice(a * b0, (a + 1) * b0), slice(b * b1, (b + 1) * b1)
            out[rows, cols] = v[rows, cols] * s[a, b]
    return out


def write_fp8(src: Path, folder: Path, layout: str, block: tuple[int, int] = BLOCK) -> tuple[Path, Path]:
    """The FP8 checkpoint of ``src`` (``layout`` "block" or "channel"; ``block``: the block
    size), and beside it a float32 checkpoint of the reference-dequantised weights; returns
    both folders."""
    state = load_file(str(src / "model.safetensors"))
    fp8: dict[str, torch.Tensor] = {}
    ref: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        if not quantised(name, t):
            fp8[name] = ref[name] = t
            continue
        if layout == "block":
            q, s = quantise_block(t, block)
            fp8[name], fp8[name + "_scale_inv"] = q, s
            ref[name] = torch.from_numpy(dequantise_ref(q, s, block)).float()
        else:
            s = (t.double().abs().amax(dim=1, keepdim=True) / FP8_MAX).to(torch.bfloat16)
            q = (t.double() / s.double()).to(torch.float8_e4m3fn)
            stem = name[: -len("weight")]
            fp8[name], fp8[stem + "weight_scale"] = q, s
            fp8[stem + "input_scale"] = torch.tensor([0.02], dtype=torch.float32)
            ref[name] = torch.from_numpy(dequantise_ref(q, s, None)).float()
    config = json.loads((src / "config.json").read_text())
    out, deq = folder / f"fp8-{layout}", folder / f"fp8-{layout}-dequantised"
    block_config = {**BLOCK_CONFIG, "weight_block_size": list(block)}
    for path, tensors, cfg in ((out, fp8, {**config, "quantization_config": block_config if layout == "block"
                                           else CT_CONFIG}), (deq, ref, config)):
        path.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
        (path / "config.json").write_text(json.dumps(cfg))
        for name, text in tiny_models.SIDE_FILES.items():
            (path / name).write_text(text)
    return out, deq


@pytest.fixture(scope="module")
def fp8_models(tmp_path_factory):
    """``get(arch, layout) -> (fp8 folder, dequantised float32 folder, Tucker of the fp8 folder)``."""
    root = tmp_path_factory.mktemp("fp8")
    cache: dict[tuple[str, str], tuple[Path, Path, Path]] = {}

    def get(arch: str, layout: str) -> tuple[Path, Path, Path]:
        if (arch, layout) not in cache:
            overrides = {"deepseek_v3": dict(num_key_value_heads=4)}.get(arch, {})
            src = M.build_random(arch, root / f"{arch}-{layout}-src", seed=5, **overrides)
            fp8, deq = write_fp8(src, root / arch, layout)
            cache[(arch, layout)] = (fp8, deq, R.decompose_tiny(fp8, root / arch / f"{layout}-tucker"))
        return cache[(arch, layout)]

    return get


def _raw(folder: Path, name: str) -> tuple[str, bytes]:
    from tuckerize.checkpoint import Checkpoint

    ckpt = Checkpoint.open(folder)
    return ckpt.dtype(name), ckpt.get(name).contiguous().view(torch.uint8).numpy().tobytes()


# ------------------------------------------------------------------------------- the maths


@pytest.mark.parametrize("shape", [(300, 200), (256, 384), (3, 130, 129)])
def test_block_dequantisation_equals_float64_loops(shape):
    """128 x 128 blocks (the releases' size), with partial edge blocks and a leading expert axis."""
    from tuckerize.fp8 import Fp8Format, dequantize

    g = torch.Generator().manual_seed(0)
    w = torch.randn(shape, generator=g) * torch.logspace(-3, 1, shape[-1])  # scales differ per block
    pairs = [quantise_block(m, (128, 128)) for m in w.reshape(-1, *shape[-2:])]
    q = torch.stack([p[0] for p in pairs]).reshape(shape)
    s = torch.stack([p[1] for p in pairs]).reshape(*shape[:-2], *pairs[0][1].shape)
    ref = np.stack([dequantise_ref(a, b, (128, 128)) for a, b in pairs]).reshape(shape)
    fmt = Fp8Format.from_config({"quantization_config": {**BLOCK_CONFIG, "weight_block_size": [128, 128]}})
    got = dequantize(q, s, fmt.block)
    assert got.dtype == torch.float32 and got.shape == w.shape
    assert R.rel_err(torch.from_numpy(ref), got) < 1e-7
    assert R.rel_err(w, got) < 0.05  # and it is the weight, up to e4m3's rounding
    assert dequantize(q, s).equal(got)  # no block given: 128 x 128 fits these grids


@pytest.mark.parametrize("kind", ["channel", "tensor", "scalar"])
def test_compressed_tensors_scales_equal_float64(kind):
    from tuckerize.fp8 import dequantize

    g = torch.Generator().manual_seed(1)
    w = torch.randn(40, 24, generator=g) * torch.logspace(-2, 1, 40)[:, None]
    if kind == "channel":
        s = (w.abs().amax(dim=1, keepdim=True) / FP8_MAX).to(torch.bfloat16)
    else:
        s = (w.abs().max() / FP8_MAX).reshape(1 if kind == "tensor" else ())
    q = (w.double() / s.double()).to(torch.float8_e4m3fn)
    ref = dequantise_ref(q, s, None)
    got = dequantize(q, s)
    assert R.rel_err(torch.from_numpy(ref), got) < 1e-7
    assert R.rel_err(w, got) < 0.05


def test_block_scale_that_does_not_fit_is_an_error():
    from tuckerize.fp8 import dequantize

    q = torch.zeros(300, 200).to(torch.float8_e4m3fn)
    with pytest.raises(InputError, match="weight_block_size"):
        dequantize(q, torch.ones(2, 2), (128, 128))


def test_formats_from_config():
    from tuckerize.fp8 import Fp8Format

    assert Fp8Format.from_config({}) is None
    assert Fp8Format.from_config({"quantization_config": BLOCK_CONFIG}) == Fp8Format("fp8", BLOCK)
    assert Fp8Format.from_config({"quantization_config": CT_CONFIG}) == Fp8Format("compressed-tensors", None)
    blocked = json.loads(json.dumps(CT_CONFIG))
    blocked["config_groups"]["group_0"]["weights"].update(strategy="block", block_structure=[128, 128])
    assert Fp8Format.from_config({"quantization_config": blocked}).block == (128, 128)
    int4 = json.loads(json.dumps(CT_CONFIG))
    int4["config_groups"]["group_0"]["weights"].update(num_bits=4, type="int")
    with pytest.raises(InputError, match="not FP8"):
        Fp8Format.from_config({"quantization_config": int4})
    assert Fp8Format.from_config({"quantization_config": {"quant_method": "awq"}}) is None


# --------------------------------------------------------------------- reading checkpoints


@pytest.mark.parametrize("arch,layout", [("qwen3_moe", "block"), ("deepseek_v3", "block"),
                                         ("qwen3_moe", "channel")])
def test_stacked_experts_equal_reference(arch, layout, fp8_models):
    """Every stacked projection of an FP8 checkpoint is the float64 reference dequantisation."""
    from tuckerize.arch import PROJECTIONS, moe_spec
    from tuckerize.checkpoint import Checkpoint, load_config
    from tuckerize.experts import stack_projection

    fp8, deq, _ = fp8_models(arch, layout)
    spec = moe_spec(load_config(fp8))
    ckpt, ref = Checkpoint.open(fp8), Checkpoint.open(deq)
    assert ckpt.dtype(spec.arch.expert_name(spec.moe_layers[0], "gate", 0)) == "F8_E4M3"
    for layer in spec.moe_layers:
        for p in PROJECTIONS:
            got = stack_projection(ckpt, spec, layer, p)
            want = stack_projection(ref, spec, layer, p)
            assert got.dtype == torch.float32
            assert R.rel_err(want, got) < 1e-7, (layer, p)


def test_missing_scale_is_an_error(fp8_models, tmp_path):
    from tuckerize.checkpoint import Checkpoint

    fp8, _, _ = fp8_models("qwen3_moe", "block")
    broken = tmp_path / "broken"
    shutil.copytree(fp8, broken)
    state = load_file(str(broken / "model.safetensors"))
    del state["model.layers.0.mlp.experts.1.up_proj.weight_scale_inv"]
    save_file(state, str(broken / "model.safetensors"))
    with pytest.raises(InputError, match="weight_scale_inv"):
        Checkpoint.open(broken).get("model.layers.0.mlp.experts.1.up_proj.weight", dequantize=True)


# ----------------------------------------------------------------------- decompose end to end


@pytest.mark.parametrize("arch,layout", [("qwen3_moe", "block"), ("deepseek_v3", "block"),
                                         ("qwen3_moe", "channel")])
def test_decompose_keeps_non_experts_fp8_byte_identical(arch, layout, fp8_models, tmp_path):
    from tuckerize.checkpoint import Checkpoint
    from tuckerize.fp8 import is_scale_name

    fp8, deq, tucker = fp8_models(arch, layout)
    src, out = Checkpoint.open(fp8), Checkpoint.open(tucker)
    experts = [n for n in src.keys() if ".mlp.experts." in n]
    kept = [n for n in src.keys() if n not in experts]
    assert any(is_scale_name(n) for n in experts) and any(src.dtype(n) == "F8_E4M3" for n in kept)
    for name in kept:  # every non-expert tensor, FP8 weights and their scales included
        assert _raw(fp8, name) == _raw(tucker, name), name
    assert not [n for n in out.keys() if ".mlp.experts." in n and not n.split(".")[-1] in
                ("U_E", "U_H", "U_I", "core")], "expert scales must not be carried over"
    config = tiny_models.read_config(tucker)
    assert config["quantization_config"] == tiny_models.read_config(fp8)["quantization_config"]
    assert config["tucker"]["fp8"]["method"] == ("fp8" if layout == "block" else "compressed-tensors")
    manifest = json.loads((tucker / "tuckerize_manifest.json").read_text())
    assert manifest["source"]["expert_dtypes"] == ["F8_E4M3"]
    assert "F8_E4M3" in manifest["source"]["dtypes"]
    # The factors are those of the dequantised weights: same decomposition of the same values.
    same = R.decompose_tiny(deq, tmp_path / "deq-tucker")
    for layer in M.moe_layers(fp8):
        got, want = R.tucker_dense(tucker, layer), R.tucker_dense(same, layer)
        for p in want:
            assert R.rel_err(want[p], got[p]) < 1e-5, (layer, p)
    assert json.loads((same / "tuckerize_manifest.json").read_text())["source"]["quantization"] is None


# ------------------------------------------------------------------------- the native runtime


@pytest.mark.parametrize("layout", ["block", "channel"])
def test_native_runtime_reads_fp8(layout, fp8_models):
    """The native runtime on the FP8 original and on its Tucker checkpoint against transformers'
    model of the reference-dequantised weights (the Tucker one with the factors' dense experts)."""
    from tuckerize.runtime.loader import TensorSource
    from tuckerize.runtime.model import CausalLM
    from tuckerize.parallel import ParallelContext

    fp8, deq, tucker = fp8_models("qwen3_moe", layout)
    ids = torch.randint(0, tiny_models.VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    for folder, ref in ((fp8, M.hf_logits(deq, ids)), (tucker, M.hf_logits(deq, ids, tucker=tucker))):
        source = TensorSource.open(folder, parallel=ParallelContext())
        with torch.no_grad():
            got = CausalLM(source, dense_experts=not source.is_tucker, dtype=torch.float32).eval()(ids)
        assert float(ref.std()) > 0.3
        assert R.rel_err(ref, got) < 1e-4, folder.name


def test_shard_set_of_fp8_tucker_is_dequantised(fp8_models, tmp_path):
    """Block scales do not follow arbitrary row splits: shards hold dequantised tensors."""
    from tuckerize.checkpoint import Checkpoint
    from tuckerize.shard import shard_checkpoint

    fp8, deq, tucker = fp8_models("qwen3_moe", "block")
    out = tmp_path / "shards"
    shard_checkpoint(tucker, 2, out=out)
    assert "quantization_config" not in tiny_models.read_config(out)
    name = "model.layers.0.self_attn.o_proj.weight"  # split by columns
    parts = [Checkpoint.open(out / f"rank-{r:05d}-of-00002") for r in range(2)]
    assert not [n for c in parts for n in c.keys() if "scale" in n]
    got = torch.cat([c.get(name) for c in parts], dim=1)
    assert got.dtype == torch.float32
    assert R.rel_err(Checkpoint.open(deq).get(name), got) < 1e-7


def test_transformers_path_reads_fp8(fp8_models):
    """DeepSeek-V3 (no native runtime): the FP8 original and its Tucker checkpoint through
    transformers equal transformers' model of the reference-dequantised weights."""
    from tuckerize.runtime.hf import load_hf_model

    fp8, deq, tucker = fp8_models("deepseek_v3", "block")
    ids = torch.randint(0, tiny_models.VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    for folder, ref in ((fp8, M.hf_logits(deq, ids)), (tucker, M.hf_logits(deq, ids, tucker=tucker))):
        with torch.no_grad():
            got = load_hf_model(folder, dtype=torch.float32)(ids).logits
        assert float(ref.std()) > 0.3
        assert R.rel_err(ref, got) < 1e-4, folder.name


@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v3"])
def test_calibrated_decompose_of_fp8_equals_dequantised(arch, fp8_models, tmp_path):
    """Calibration (native layers for Qwen3-MoE, transformers' layers for DeepSeek-V3) runs on
    the FP8 checkpoint exactly as on the float32 checkpoint of its dequantised weights."""
    from tuckerize.compress import decompose_checkpoint

    fp8, deq, _ = fp8_models(arch, "block")
    outs = [tmp_path / "fp8", tmp_path / "deq"]
    for src, out in zip((fp8, deq), outs):
        decompose_checkpoint(str(src), out, ranks=(4, 16, 8), calibration="demo", samples=2, seqlen=16)
    for layer in M.moe_layers(fp8):
        got, want = R.tucker_dense(outs[0], layer), R.tucker_dense(outs[1], layer)
        for p in want:
            assert R.rel_err(want[p], got[p]) < 1e-5, (layer, p)


def test_fused_fp8_experts_equal_reference(tmp_path):
    """The fused layout (``experts.gate_up_proj [E, 2I, H]`` with ``gate_up_proj_scale_inv
    [E, ceil(2I/b0), ceil(H/b1)]``, as transformers' FP8 experts name them), and E8M0 scales."""
    from tuckerize.arch import PROJECTIONS, moe_spec
    from tuckerize.checkpoint import Checkpoint, load_config
    from tuckerize.experts import stack_projection

    fused = tiny_models.build_fused(tmp_path / "fused", arch="qwen3_moe")
    state = load_file(str(fused / "model.safetensors"))
    ref = dict(state)
    for name in [n for n in state if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        pairs = [quantise_block(m, BLOCK) for m in state[name]]
        q, s = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
        if name.endswith("down_proj"):  # powers of two as UE8M0 scales (DeepSeek-V3.1's scale format)
            s = torch.exp2(torch.ceil(torch.log2(s)))
            q = torch.stack([(m.double() / sm.repeat_interleave(BLOCK[0], 0)[: m.shape[0]]
                              .repeat_interleave(BLOCK[1], 1)[:, : m.shape[1]].double()).to(torch.float8_e4m3fn)
                             for m, sm in zip(state[name], s)])
            s = s.to(torch.float8_e8m0fnu)
        state[name], state[name + "_scale_inv"] = q, s
        ref[name] = torch.from_numpy(np.stack([dequantise_ref(a, b, BLOCK) for a, b in zip(q, s)])).float()
    fp8, deq = tmp_path / "fp8", tmp_path / "deq"
    for folder, tensors, extra in ((fp8, state, {"quantization_config": BLOCK_CONFIG}), (deq, ref, {})):
        folder.mkdir()
        save_file(tensors, str(folder / "model.safetensors"))
        (folder / "config.json").write_text(json.dumps({**tiny_models.read_config(fused), **extra}))
    spec = moe_spec(load_config(fp8))
    for layer in spec.moe_layers:
        for p in PROJECTIONS:
            want = stack_projection(Checkpoint.open(deq), spec, layer, p)
            assert R.rel_err(want, stack_projection(Checkpoint.open(fp8), spec, layer, p)) < 1e-7, (layer, p)


@pytest.mark.parametrize("named, want", [("bfloat16", "bf16"), ("float16", "fp16"), ("float32", "float32"),
                                         (None, "bf16")])
def test_fp8_factors_take_the_compute_dtype(named, want, fp8_models, tmp_path):
    """FP8 experts: factors are stored in the dtype the config says the model computes in
    (bf16 where it names none, as the releases compute); the source bytes are the e4m3
    weights plus their float32 block scales, counted here from the shapes."""
    from safetensors import safe_open

    fp8, _, _ = fp8_models("qwen3_moe", "block")
    src = tmp_path / "src"
    shutil.copytree(fp8, src)
    config = json.loads((src / "config.json").read_text())
    config.pop("torch_dtype", None)
    config.pop("dtype", None)
    if named is not None:
        config["dtype"] = named
    (src / "config.json").write_text(json.dumps(config))
    R.decompose_tiny(src, tmp_path / "tucker")
    b = json.loads((tmp_path / "tucker" / "tuckerize_manifest.json").read_text())["bytes"]
    assert b["dtypes"] == {f: want for f in ("U_E", "U_H", "U_I", "core")} and b["dtypes_from"] == "source"
    assert b["source_dtype"]["dtype"] == want and b["source_dtype"]["stored"] == ["F8_E4M3"]
    assert ("names no dtype" if named is None else f"config dtype {named}") in b["source_dtype"]["reason"]
    want_source = 0
    with safe_open(str(src / "model.safetensors"), "pt") as f:
        for name in f.keys():
            if ".mlp.experts." in name:
                shape = f.get_slice(name).get_shape()
                want_source += int(np.prod(shape)) * (1 if name.endswith(".weight") else 4)
    assert b["experts_source"] == want_source
    assert b["ratio_to_source"] == pytest.approx(b["experts_stored"] / want_source)
    fp8_entry = tiny_models.read_config(tmp_path / "tucker")["tucker"]["fp8"]
    assert fp8_entry["experts"] == ("dequantised to float32 factors" if want == "float32"
                                    else f"dequantised to float32, decomposed, factors stored as {want}")

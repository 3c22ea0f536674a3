"""Factors are stored in the source's dtype unless --factor-dtype says otherwise, and the
manifest's ``bytes`` states the stored expert bytes against the source as stored and against
bf16 dense experts. Every byte count is checked against one computed here from the tensor
shapes and dtypes (and against the bytes actually written), not read back from the manifest."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import tiny_models
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tuckerize.compress import decompose_checkpoint

RANKS = (3, 12, 6)
FACTORS = ("U_E", "U_H", "U_I", "core")
ITEMSIZE = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2}
EXPERT = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight$")


def shapes(folder: Path) -> tuple[int, int, int, int]:
    """(E, H, I, MoE layers) counted from the source's expert tensor names and shapes."""
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        hits = [(EXPERT.match(n), n) for n in f.keys()]
        hits = [(m, n) for m, n in hits if m]
        layers = {int(m.group(1)) for m, _ in hits}
        experts = {int(m.group(2)) for m, _ in hits}
        I, H = f.get_slice(next(n for m, n in hits if m.group(3) == "gate")).get_shape()
    return len(experts), H, I, len(layers)


def factor_bytes_written(out: Path) -> int:
    """Bytes of every factor tensor in the output files (codes, scales and shapes included)."""
    total = 0
    for path in out.glob("model-*.safetensors"):
        for name, t in load_file(str(path)).items():
            if ".mlp.experts." in name:
                total += t.numel() * t.element_size()
    return total


def run(src: Path, out: Path, **kw) -> dict:
    return decompose_checkpoint(str(src), out, ranks=",".join(map(str, RANKS)), **kw)


@pytest.mark.parametrize("dtype, name", [(torch.bfloat16, "bf16"), (torch.float16, "fp16")])
def test_half_precision_source_keeps_its_dtype(tiny_factory, tmp_path, dtype, name):
    src = tiny_factory("qwen3_moe", dtype=dtype)
    m = run(src, tmp_path / "default")
    wide = run(src, tmp_path / "f32", factor_dtype="float32")
    stored, exact = load_file(str(tmp_path / "default" / "model-00001-of-00003.safetensors")), \
        load_file(str(tmp_path / "f32" / "model-00001-of-00003.safetensors"))
    factors = [n for n in stored if n.split(".")[-1] in FACTORS]
    assert len(factors) == 12
    for n in factors:  # the float32 decomposition, rounded once to the source's dtype
        assert stored[n].dtype == dtype and exact[n].dtype == torch.float32, n
        assert torch.equal(stored[n], exact[n].to(dtype)), n
    config = tiny_models.read_config(tmp_path / "default")
    assert config["tucker"]["factor_storage"]["dtypes"] == {f: name for f in FACTORS}
    assert "factor_storage" not in tiny_models.read_config(tmp_path / "f32")["tucker"]

    E, H, I, L = shapes(src)
    rE, rH, rI = RANKS
    per_projection = E * rE + H * rH + I * rI + rE * rH * rI
    want_stored = 3 * L * per_projection * ITEMSIZE[dtype]
    want_source = 3 * L * E * H * I * ITEMSIZE[dtype]
    want_bf16 = 3 * L * E * H * I * 2
    b = m["bytes"]
    assert (b["experts_stored"], b["experts_source"], b["experts_dense_bf16"]) == (want_stored, want_source, want_bf16)
    assert b["experts_stored"] == factor_bytes_written(tmp_path / "default")
    assert b["ratio_to_source"] == pytest.approx(want_stored / want_source)
    assert b["ratio_to_bf16_dense"] == pytest.approx(want_stored / want_bf16)
    stored_name = {torch.bfloat16: "BF16", torch.float16: "F16"}[dtype]
    assert b["source_dtype"]["dtype"] == name and b["source_dtype"]["stored"] == [stored_name]
    assert b["dtypes_from"] == "source" and b["dtypes"] == {f: name for f in FACTORS}
    w = wide["bytes"]
    assert w["experts_stored"] == 3 * L * per_projection * 4 == factor_bytes_written(tmp_path / "f32")
    assert w["ratio_to_source"] == pytest.approx(2 * want_stored / want_source)
    assert w["dtypes_from"] == "factor_dtype float32"
    # errors are those of the decomposition, before storage: the same for both runs
    assert [t["relative_error"] for t in m["tensors"]] == [t["relative_error"] for t in wide["tensors"]]


def test_partial_factor_dtype_fills_in_the_source_dtype(tiny_factory, tmp_path):
    src = tiny_factory("qwen3_moe", dtype=torch.bfloat16)
    m = run(src, tmp_path / "o", factor_dtype="core=int8")
    assert m["bytes"]["dtypes"] == {"U_E": "bf16", "U_H": "bf16", "U_I": "bf16", "core": "int8"}
    assert m["bytes"]["dtypes_from"] == "factor_dtype core=int8"
    assert m["bytes"]["experts_stored"] == factor_bytes_written(tmp_path / "o")
    stored = load_file(str(tmp_path / "o" / "model-00001-of-00003.safetensors"))
    assert stored["model.layers.0.mlp.experts.gate.U_H"].dtype == torch.bfloat16
    assert stored["model.layers.0.mlp.experts.gate.core.qweight"].dtype == torch.int8


def test_float32_source_default_is_the_old_float32_output(tiny_factory, tmp_path):
    """A float32 source: the default writes what --factor-dtype float32 writes, byte for byte
    (format version 1, no factor_storage); the manifests differ only in where the dtype came from."""
    src = tiny_factory("qwen3_moe")
    a, b = run(src, tmp_path / "a"), run(src, tmp_path / "b", factor_dtype="float32")
    for path in sorted((tmp_path / "a").iterdir()):
        if path.name != "tuckerize_manifest.json":
            assert path.read_bytes() == (tmp_path / "b" / path.name).read_bytes(), path.name
    assert a["fingerprint"] == b["fingerprint"] and a["settings"]["factor_dtype"] == "float32"
    assert (a["bytes"]["dtypes_from"], b["bytes"]["dtypes_from"]) == ("source", "factor_dtype float32")
    E, H, I, L = shapes(src)
    assert a["bytes"]["experts_source"] == 3 * L * E * H * I * 4
    assert a["bytes"]["ratio_to_source"] == pytest.approx(a["bytes"]["ratio_to_bf16_dense"] / 2)


def _recast(src: Path, dst: Path, dtype_of) -> Path:
    """A copy of ``src`` with each tensor cast to ``dtype_of(name, tensor)``."""
    dst.mkdir()
    for f in src.iterdir():
        if f.name != "model.safetensors":
            (dst / f.name).write_bytes(f.read_bytes())
    state = load_file(str(src / "model.safetensors"))
    save_file({n: t.to(dtype_of(n, t)).contiguous() for n, t in state.items()}, str(dst / "model.safetensors"),
              metadata={"format": "pt"})
    return dst


def test_mixed_dtype_sources(tiny_factory, tmp_path):
    src = tiny_factory("qwen3_moe")
    # experts in bf16, everything else float32: the experts' dtype
    experts_bf16 = _recast(src, tmp_path / "experts-bf16",
                           lambda n, t: torch.bfloat16 if EXPERT.match(n) else torch.float32)
    m = run(experts_bf16, tmp_path / "o1")
    assert m["bytes"]["source_dtype"] == {"dtype": "bf16", "stored": ["BF16"],
                                          "reason": "routed experts stored in BF16"}
    # layer 0's experts bf16, layer 1's float32: the widest, and the manifest says why
    split = _recast(src, tmp_path / "split",
                    lambda n, t: torch.bfloat16 if EXPERT.match(n) and EXPERT.match(n).group(1) == "0" else torch.float32)
    m = run(split, tmp_path / "o2")
    d = m["bytes"]["source_dtype"]
    assert d["dtype"] == "float32" and d["stored"] == ["BF16", "F32"]
    assert "several dtypes" in d["reason"] and "float32" in d["reason"]
    assert "factor_storage" not in tiny_models.read_config(tmp_path / "o2")["tucker"]
    E, H, I, L = shapes(src)
    assert m["bytes"]["experts_source"] == 3 * E * H * I * 2 + 3 * E * H * I * 4  # one layer each


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_runtime_reads_half_precision_factors(tiny_factory, tmp_path, dtype):
    """The native runtime on a checkpoint whose factors are stored in the source's half
    precision equals transformers' model (float32) with the dense experts rebuilt from those
    stored factors in float64."""
    import model_refs as M
    import tucker_refs as R

    from tuckerize.parallel import ParallelContext
    from tuckerize.runtime.loader import TensorSource
    from tuckerize.runtime.model import CausalLM

    src = tiny_factory("qwen3_moe", dtype=dtype)
    out = R.decompose_tiny(src, tmp_path / "tucker")
    assert load_file(str(out / "model-00001-of-00003.safetensors"))["model.layers.0.mlp.experts.up.core"].dtype == dtype
    ids = torch.randint(0, tiny_models.VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    ref = M.hf_logits(src, ids, tucker=out)
    with torch.no_grad():
        got = CausalLM(TensorSource.open(out, parallel=ParallelContext()), dtype=torch.float32).eval()(ids)
    assert float(ref.std()) > 0.1
    assert R.rel_err(ref, got) < 1e-4

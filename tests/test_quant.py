"""Quantised factor storage (tuckerize/quant.py) against an independent float64 reference,
and the --factor-dtype path end to end: decompose -> load -> runtime -> shard."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from tuckerize import quant


def _ref_quantize(x: np.ndarray, qmax: float, group: int, fp8: bool = False) -> np.ndarray:
    """float64 reference: symmetric per-group round-to-nearest along the last axis, float16
    scales, written from the definition (loop over groups)."""
    m = x.reshape(-1, x.shape[-1]).astype(np.float64)
    out = np.zeros_like(m)
    g = min(group, m.shape[1])
    for r in range(m.shape[0]):
        for c0 in range(0, m.shape[1], g):
            blk = m[r, c0 : c0 + g]
            scale = float(np.float16(np.abs(blk).max() / qmax))
            if scale == 0:
                continue
            if fp8:
                q = torch.tensor(blk / scale, dtype=torch.float64).clamp(-448, 448).to(torch.float8_e4m3fn).double().numpy()
            else:
                q = np.clip(np.round(blk / scale), -qmax, qmax)
            out[r, c0 : c0 + g] = q * scale
    return out.reshape(x.shape)


@pytest.mark.parametrize("dtype,qmax", [("int8", 127), ("int4", 7), ("fp8", 448)])
@pytest.mark.parametrize("shape,group", [((37, 201), 64), ((5, 6, 7), 128), ((16, 128), 128)])
def test_roundtrip_matches_float64_reference(dtype, qmax, shape, group):
    torch.manual_seed(0)
    x = torch.randn(shape)
    stored = quant.encode("w", x, dtype, group)
    got = quant.decode(stored, "w")
    ref = _ref_quantize(x.double().numpy(), qmax, group, fp8=dtype == "fp8")
    assert got.shape == x.shape and got.dtype == torch.float32
    assert float(np.linalg.norm(got.double().numpy() - ref) / np.linalg.norm(ref)) < 1e-6
    # the stored bytes are what tensor_bytes reports
    assert sum(t.numel() * t.element_size() for t in stored.values()) == quant.tensor_bytes(shape, dtype, group)
    # and the error is what the format promises: int8 << int4
    rel = float((got - x).norm() / x.norm())
    assert rel < {"int8": 0.01, "fp8": 0.04, "int4": 0.15}[dtype]


def test_int4_packing_two_codes_per_byte_low_nibble_first():
    codes = torch.tensor([[-7, 7, 0], [3, -1, -7]], dtype=torch.int8)
    packed = quant.pack_int4(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (2, 2)
    assert int(packed[0, 0]) == (1 | (15 << 4)) and int(packed[0, 1]) == 8 | (8 << 4)  # odd column padded with 0 -> 8
    assert torch.equal(quant.unpack_int4(packed, 3), codes)


def test_zero_group_and_parse_errors():
    x = torch.zeros(3, 8)
    x[1, 2] = 1.5
    assert torch.equal(quant.fake_quantize(x, "int4", 4), torch.tensor(_ref_quantize(x.numpy(), 7, 4)).float())
    assert quant.parse_factor_dtype("int8,core=int4") == {"U_E": "int8", "U_H": "int8", "U_I": "int8", "core": "int4"}
    assert quant.parse_factor_dtype("core=int4") == {"U_E": "float32", "U_H": "float32", "U_I": "float32", "core": "int4"}
    from tuckerize.errors import InputError

    with pytest.raises(InputError, match="int9"):
        quant.parse_factor_dtype("int9")
    with pytest.raises(InputError, match="U_X"):
        quant.parse_factor_dtype("U_X=int8")


def test_core_refit_is_the_least_squares_core():
    """refit_core against the float64 least-squares solution of the unfolded problem
    vec(T) = (Q_I kron Q_H kron Q_E) vec(core'), T the unquantised reconstruction."""
    g = torch.Generator().manual_seed(1)
    E, H, I, r = 5, 7, 6, (3, 4, 2)
    U = {f: torch.linalg.qr(torch.randn(n, k, generator=g))[0] for f, n, k in zip(("U_E", "U_H", "U_I"), (E, H, I), r)}
    core = torch.randn(*r, generator=g)
    Q = {f: quant.fake_quantize(u, "int4") for f, u in U.items()}
    got = quant.refit_core(core, U, Q).double().numpy()
    T = np.einsum("abc,ea,hb,ic->ehi", core.double().numpy(), *(U[f].double().numpy() for f in ("U_E", "U_H", "U_I")))
    A = np.einsum("ea,hb,ic->ehiabc", *(Q[f].double().numpy() for f in ("U_E", "U_H", "U_I"))).reshape(E * H * I, -1)
    ref = np.linalg.lstsq(A, T.reshape(-1), rcond=None)[0].reshape(r)
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 1e-5

    def err(c):
        R = np.einsum("abc,ea,hb,ic->ehi", c, *(Q[f].double().numpy() for f in ("U_E", "U_H", "U_I")))
        return np.linalg.norm(R - T)

    assert err(got) < err(core.double().numpy())


# -- end to end ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def decomposed(tiny_factory, tmp_path_factory):
    from tuckerize.compress import decompose_checkpoint

    src = tiny_factory("qwen3_moe")
    root = tmp_path_factory.mktemp("quant")
    out = {}
    for fd in ("float32", "int8,core=int4"):
        out[fd] = root / fd.replace(",", "_").replace("=", "-")
        decompose_checkpoint(str(src), out[fd], ranks=(6, 24, 12), factor_dtype=fd)
    return src, out


def test_quantised_checkpoint_reads_back_the_quantised_factors(decomposed):
    from tuckerize.arch import FACTORS, PROJECTIONS
    from tuckerize.format import TuckerCheckpoint

    _, out = decomposed
    f32, q = TuckerCheckpoint.open(out["float32"]), TuckerCheckpoint.open(out["int8,core=int4"])
    assert "format_version" in q.config["tucker"] and q.config["tucker"]["format_version"] == 2
    assert q.config["tucker"]["factor_storage"]["dtypes"]["core"] == "int4"
    assert not any(k.endswith(".qweight") for k in f32.tensors.keys())
    for layer in q.spec.moe_layers:
        for p in PROJECTIONS:
            a, b = f32.factors(layer, p), q.factors(layer, p)
            for f in FACTORS[:3]:  # U's: exactly the int8 round trip of the float32 factors
                assert q.tensors.dtype(f"{q.arch.experts_prefix(layer)}.{p}.{f}.qweight") == "I8"
                assert torch.equal(b[f], quant.fake_quantize(a[f], "int8"))
            want = quant.quantize_factors(a, quant.parse_factor_dtype("int8,core=int4"))["core"]
            assert torch.equal(b["core"], quant.fake_quantize(want, "int4"))


def test_manifest_bytes_match_the_files(decomposed):
    from safetensors import safe_open

    _, out = decomposed
    for fd, folder in out.items():
        man = json.loads((folder / "tuckerize_manifest.json").read_text())
        b = man["bytes"]
        stored = 0
        index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
        for name, file in index.items():
            if ".experts." in name:
                with safe_open(str(folder / file), "pt") as fh:
                    t = fh.get_tensor(name)
                stored += t.numel() * t.element_size()
        assert b["experts_stored"] == stored, fd
        assert math.isclose(b["ratio_to_bf16_dense"], stored / b["experts_dense_bf16"])


def test_runtime_and_shard_load_quantised_factors(decomposed, tmp_path):
    from tuckerize.runtime.loader import TensorSource
    from tuckerize.runtime.model import CausalLM
    from tuckerize.shard import shard_checkpoint

    src, out = decomposed
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = CausalLM(TensorSource.open(out["float32"]), dtype=torch.float32)(ids)
        got = CausalLM(TensorSource.open(out["int8,core=int4"]), dtype=torch.float32)(ids)
    rel = float((got - ref).norm() / ref.norm())
    assert 0 < rel < 0.05



@pytest.mark.parametrize("layout", ["intermediate", "expert", "hybrid", "hybrid-replicated-out"])
def test_shard_keeps_quantised_factors_where_the_split_allows(decomposed, layout, tmp_path):
    """Each rank's file holds its slice of every factor, quantised where the split keeps whole
    rows or groups (codes and scales sliced, not dequantised), float32 elsewhere; either way
    it reads back as exactly the slice of the dequantised whole factor."""
    from tuckerize.checkpoint import Checkpoint
    from tuckerize.format import TuckerCheckpoint
    from tuckerize.parallel import Split, take
    from tuckerize.shard import shard_checkpoint

    _, out = decomposed
    whole = Checkpoint.open(out["int8,core=int4"])
    manifest = shard_checkpoint(out["int8,core=int4"], 2, layout=layout, out=tmp_path / layout)
    quantised = 0
    for r, entry in enumerate(manifest["ranks"]):
        rank = Checkpoint.open(tmp_path / layout / entry["dir"])
        names = quant.logical_names(rank.weight_map)
        for name in (n for n in names if ".experts." in n):
            sp = manifest["splits"].get(name)
            split = None
            if sp is not None and "rows" in sp:
                split = Split(sp["axis"], 0, len(sp["rows"][r]), index=tuple(sp["rows"][r]))
            elif sp is not None:
                split = Split(sp["axis"], *sp["ranges"][r])
            assert torch.equal(rank.get(name), take(whole.get(name), split)), (r, name)
            quantised += quant.is_quantised(rank.weight_map, name)
        if layout == "intermediate":  # U_I split by rows: stays int8
            assert any(k.endswith("gate.U_I.qweight") for k in rank.weight_map)
    assert quantised > 0
    for r, entry in enumerate(manifest["ranks"]):  # the per-layer bytes reported: the expert tensors in the files
        rank = Checkpoint.open(tmp_path / layout / entry["dir"])
        held = sum(rank.get(n).numel() * rank.get(n).element_size() for n in rank.weight_map if ".experts." in n)
        assert manifest["expert_bytes_per_layer"][r] == held / len(TuckerCheckpoint.open(out["float32"]).spec.moe_layers)
    stored = sum(f["bytes"] for entry in manifest["ranks"] for f in entry["files"].values())
    assert stored < 2 * sum((out["float32"] / f).stat().st_size for f in whole.files)


@pytest.mark.parametrize("dtype", ["int4", "int8", "fp8"])
def test_slice_stored_equals_slicing_the_dequantised_tensor(dtype):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 5, 37, generator=g)  # 37 columns: group 8 leaves a short last group; int4 odd packing
    stored = quant.encode("X", x, dtype, group=8)
    whole = quant.decode(stored, "X")
    cases = [(0, None, 1, 4), (0, torch.tensor([5, 0, 2]), 0, 0), (2, None, 8, 24), (2, None, 16, 37), (2, None, 0, 37)]
    for axis, rows, start, stop in cases:
        got = quant.slice_stored(stored, "X", axis, rows=rows, start=start, stop=stop)
        assert got is not None, (axis, start, stop)
        want = whole.index_select(0, rows) if rows is not None else whole.narrow(axis, start, stop - start)
        assert torch.equal(quant.decode(got, "X"), want), (axis, start, stop)
    for axis, start, stop in [(2, 4, 16), (2, 8, 20), (1, 0, 2)]:  # cuts a group, or a middle axis
        assert quant.slice_stored(stored, "X", axis, start=start, stop=stop) is None


def test_cli_rejects_unknown_factor_dtype(qwen3_ckpt, tmp_path):
    from typer.testing import CliRunner

    from cli_helpers import assert_cli_error
    from tuckerize.cli import app

    res = CliRunner().invoke(app, ["decompose", "--model", str(qwen3_ckpt), "--ranks", "4,16,8", "--out",
                                   str(tmp_path / "o"), "--factor-dtype", "int9"])
    assert_cli_error(res, "int9")

"""Packed low-bit storage (tuckerize.quant_packed): bit packing, layout round trips, bytes, slicing."""

from __future__ import annotations

import math

import pytest
import torch

from tuckerize.decompose.gptq import rtn
from tuckerize.decompose.factor_quant import stored_codes
from tuckerize.quant_grid import Grid
from tuckerize.quant_packed import decode, dequantize_rows, encode, pack, packed_bytes, slice_stored, unpack


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("cols", [1, 7, 8, 13, 64])
def test_pack_round_trip(bits, cols):
    g = torch.Generator().manual_seed(bits * 100 + cols)
    codes = torch.randint(0, 1 << bits, (5, cols), generator=g)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (5, math.ceil(cols * bits / 8))
    assert torch.equal(unpack(packed, bits, cols).long(), codes)


def test_pack_bit_order():
    # 3-bit codes 1, 2, 7 -> bits 001 010 111 from the low end: 0b11_010_001 = 0xD1, then 0b1
    assert pack(torch.tensor([[1, 2, 7]]), 3).tolist() == [[0xD1, 0x01]]


def _quantised(shape, bits, group, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(*shape, generator=g, dtype=torch.float64)
    return W, stored_codes(rtn(W, Grid(bits=bits, group=group)), transposed=False)


@pytest.mark.parametrize("bits,group", [(2, 32), (3, 64), (4, 128), (3, 24)])
def test_encode_decode_and_bytes(bits, group):
    W, q = _quantised((4, 6, 80), bits, group)
    stored = encode("x", q.codes, q.scale, q.zero, bits, group)
    back = decode(stored, "x")
    ref = q.dequantize()  # float64 reference from the same codes
    assert back.shape == W.shape
    assert torch.allclose(back.double(), ref, rtol=0, atol=1e-5 * float(ref.abs().max()))
    assert sum(t.numel() * t.element_size() for t in stored.values()) == packed_bytes(W.shape, bits, group)
    rows = dequantize_rows(stored["x.qcodes"][1:3], stored["x.qscale"][1:3], stored["x.qzero"][1:3], bits,
                           min(group, 80), 80)
    assert torch.equal(rows, back[1:3])


def test_encode_refuses_codes_out_of_range():
    with pytest.raises(ValueError, match="outside"):
        encode("x", torch.tensor([[0, 4]]), torch.ones(1, 1), torch.zeros(1, 1), 2, 2)


@pytest.mark.parametrize("bits", [2, 3])
def test_slices_keep_whole_groups(bits):
    W, q = _quantised((4, 6, 128), bits, 32, seed=3)
    stored = encode("x", q.codes, q.scale, q.zero, bits, 32)
    full = decode(stored, "x")
    for axis, kw in ((0, {"start": 1, "stop": 3}), (1, {"start": 2, "stop": 5}), (0, {"rows": torch.tensor([3, 0])}),
                     (2, {"start": 32, "stop": 96}), (2, {"start": 64, "stop": 128})):
        part = slice_stored(stored, "x", axis, **kw)
        assert part is not None
        index = kw.get("rows", torch.arange(kw.get("start", 0), kw.get("stop", 0)))
        assert torch.equal(decode(part, "x"), full.index_select(axis, index))
    assert slice_stored(stored, "x", 2, start=16, stop=48) is None  # cuts a group

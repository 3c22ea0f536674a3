"""The safetensors writer streams each tensor's bytes from its memory (no serialised copy of
the file) and writes exactly the bytes of safetensors' own ``save``: every dtype a checkpoint
holds, empty and 0-d tensors, non-contiguous views, with and without metadata (several
metadata keys: the same header as parsed JSON, since safetensors' own key order varies)."""

from __future__ import annotations

import json
import random
import struct

import pytest
import torch
from safetensors.torch import load_file, save

import tuckerize.checkpoint as ck

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
          torch.int8, torch.uint8, torch.bool, torch.float8_e4m3fn, torch.float8_e5m2]


def _tensors(seed: int) -> dict[str, torch.Tensor]:
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i in range(rng.randrange(1, 14)):
        dtype = rng.choice(DTYPES)
        shape = [rng.choice([0, 1, 3, 7]) for _ in range(rng.randrange(0, 4))]
        t = torch.randn(tuple(shape), generator=g) * 4
        t = t.to(dtype) if dtype.is_floating_point else (t.to(torch.int64) % 100).to(dtype)
        if t.dim() == 2 and rng.random() < 0.5:
            t = t.T  # a non-contiguous view
        out[f"{rng.choice(['model.layers.0', 'lm_head', 'a', 'z.b'])}.{i}.{rng.choice(['weight', 'U_H', 'core'])}"] = t
    return out


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("metadata", [None, {"format": "pt"}, {"format": "pt", "source": "x", "b": "2"}])
def test_bytes_equal_safetensors_save(tmp_path, seed, metadata):
    tensors = _tensors(seed)
    path = tmp_path / "x.safetensors"
    ck.save_safetensors(tensors, path, metadata=metadata)
    got, want = path.read_bytes(), save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata)
    if metadata is not None and len(metadata) > 1:  # safetensors orders metadata keys as a Rust HashMap does:
        n = struct.unpack("<Q", want[:8])[0]        # differently from one call to the next
        assert got[:8] == want[:8] and got[8 + n:] == want[8 + n:]
        assert json.loads(got[8:8 + n]) == json.loads(want[8:8 + n])
    else:
        assert got == want
    back = load_file(str(path))
    assert back.keys() == tensors.keys()
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k].reshape(-1).view(torch.uint8), v.contiguous().reshape(-1).view(torch.uint8))


def test_no_serialised_copy(tmp_path, monkeypatch):
    """safetensors is asked only for the order of empty tensors; the data go to the file from
    the tensors' own memory."""
    import safetensors.torch as st

    sizes = []
    real = st.save

    def spy(tensors, metadata=None):
        sizes.append(sum(t.numel() for t in tensors.values()))
        return real(tensors, metadata=metadata)

    monkeypatch.setattr(st, "save", spy)
    big = {"w": torch.randn(256, 256), "b": torch.randn(256).to(torch.bfloat16)}
    ck.save_safetensors(big, tmp_path / "y.safetensors", metadata={"format": "pt"})
    assert sizes == [0]
    assert torch.equal(load_file(str(tmp_path / "y.safetensors"))["w"], big["w"])

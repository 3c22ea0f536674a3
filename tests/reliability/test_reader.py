"""The safetensors reader refuses damaged headers with one line naming the file: a header that
is a JSON list, entries without dtype/shape/offsets, and shapes or dtypes that disagree with
their byte ranges (checked against safetensors' own writer for the good case)."""

from __future__ import annotations

import json
import struct

import pytest
import torch

from reliab_helpers import *  # noqa: F401,F403
from reliab_helpers import in_process, one_line, run_cli, snapshot
from tuckerize.checkpoint import Checkpoint, read_header
from tuckerize.errors import InputError


def _write(path, header, data: bytes = b"") -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def _rewrite_header(path, edit) -> None:
    """Replace a real file's header by ``edit(header)`` padded to the same length (data kept)."""
    blob = path.read_bytes()
    n = struct.unpack("<Q", blob[:8])[0]
    raw = json.dumps(edit(json.loads(blob[8:8 + n])), separators=(",", ":")).encode()
    assert len(raw) <= n
    path.write_bytes(blob[:8] + raw + b" " * (n - len(raw)) + blob[8 + n:])


def test_good_file_from_safetensors(tmp_path):
    from safetensors.torch import save_file

    t = {"a": torch.arange(12, dtype=torch.float32).reshape(3, 4), "b": torch.ones(5, dtype=torch.bfloat16),
         "c": torch.zeros(0, 3, dtype=torch.int64)}
    save_file(t, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    entries = read_header(tmp_path / "model.safetensors")
    assert {k: (e.dtype, e.shape) for k, e in entries.items()} == {"a": ("F32", [3, 4]), "b": ("BF16", [5]),
                                                                  "c": ("I64", [0, 3])}
    ckpt = Checkpoint.open(tmp_path)
    for k, v in t.items():
        assert torch.equal(ckpt.get(k), v)


@pytest.mark.parametrize("header, match", [
    ([{"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}], "JSON list, not an object"),
    ("text", "JSON str, not an object"),
    ({"w": {"dtype": "F32", "shape": [2]}}, "entry w is malformed"),
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, "entry w is malformed"),
    ({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 8]}}, "entry w is malformed"),
    ({"w": {"dtype": "F32", "shape": "2", "data_offsets": [0, 8]}}, "entry w is malformed"),
    ({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, r"w is F32 \[3\] \(12 bytes\) but its byte range holds 8"),
    ({"w": {"dtype": "F64", "shape": [2], "data_offsets": [0, 8]}}, r"w is F64 \[2\] \(16 bytes\)"),
    ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, r"truncated \(\d+ of \d+ bytes\)"),
])
def test_damaged_headers(tmp_path, header, match):
    path = tmp_path / "model.safetensors"
    _write(path, header, bytes(8))
    with pytest.raises(InputError, match=rf"{path}.*{match}.*download or write it again"):
        read_header(path)


def test_list_header_in_baseline_one_line(tiny, work_copy, tmp_path):
    """Through eval, as a real process: the original model's weights file has a JSON-list header."""
    src = work_copy(tiny["src"], "src")
    path = src / "model.safetensors"
    _rewrite_header(path, lambda h: [{k: v for k, v in h.items() if k != "__metadata__"}])
    before = snapshot(src)
    proc = run_cli("eval", "--model", tiny["tucker"], "--baseline", src, "--text", tiny["text"], "--seqlen", 32,
                   "--max-windows", 1, "--allow-baseline-mismatch", cwd=tmp_path)
    assert proc.returncode == 1 and proc.stdout == ""
    one_line(proc.stderr, str(path), "JSON list", "download or write it again")
    assert snapshot(src) == before


def test_shape_mismatch_in_tucker_file_one_line(tiny, work_copy, tmp_path, monkeypatch):
    """A Tucker unit file whose header claims a larger shape than its byte range (checked with
    --no-verify, so that the reader, not the checksum, is what catches it)."""
    folder = work_copy(tiny["tucker"], "tucker")
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    name = "model.layers.1.mlp.experts.up.core"
    path = folder / index[name]

    def grow(h):
        h[name]["shape"][0] += 1
        return h

    _rewrite_header(path, grow)
    from typer.testing import CliRunner

    from tuckerize.cli import app

    monkeypatch.setenv("TUCKERIZE_CACHE", str(tmp_path / "cache"))
    result = CliRunner().invoke(app, [str(a) for a in ("eval", "--model", folder, "--baseline", tiny["src"], "--text",
                                                       tiny["text"], "--seqlen", 32, "--max-windows", 1,
                                                       "--no-verify", "--no-cache")], catch_exceptions=False)
    in_process(result, str(path), name, "byte range", "download or write it again")

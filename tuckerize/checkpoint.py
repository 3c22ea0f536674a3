"""Reading Hugging Face checkpoints lazily, and writing files atomically.

* :func:`resolve_model` turns a hub id or a local folder into a local folder
  (huggingface_hub's ``snapshot_download`` with only the files a decomposition
  needs; it honours the HF cache, ``--revision`` and ``HF_HUB_OFFLINE``).
* :class:`Checkpoint` reads ``model.safetensors.index.json`` or a single
  safetensors file and hands out one tensor at a time through safetensors'
  lazy (memory-mapped) access: nothing is read until asked for.
* :func:`atomic_write` writes to a temporary name and renames when complete, so
  an interrupted run never leaves a file that looks finished.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from tuckerize.errors import InputError
from tuckerize.fp8 import FP8_DTYPES, dequantize_from, read_format

#: Files a decomposition needs from a hub repository.
HUB_PATTERNS = (
    "*.safetensors",
    "*.safetensors.index.json",
    "config.json",
    "generation_config.json",
    "tokenizer*",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "*.model",
    "*.tiktoken",
    "chat_template*",
    "added_tokens.json",
)
#: Files copied verbatim from the source folder into any derived checkpoint.
SIDE_FILES = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


@dataclass(frozen=True)
class ModelSource:
    """Where a checkpoint came from, and where it is on this machine."""

    path: Path
    hub_id: str | None = None
    revision: str | None = None

    @property
    def label(self) -> str:
        return self.hub_id or str(self.path)


def _looks_like_path(text: str) -> bool:
    return text.startswith((".", "/", "~")) or text.count("/") > 1


def resolve_model(model: str, revision: str | None = None) -> ModelSource:
    """A local folder as is, or a hub id resolved through the Hugging Face cache."""
    path = Path(model).expanduser()
    if path.is_dir():
        return ModelSource(path=path.resolve())
    if path.exists():
        raise InputError(f"--model {model} is a file; pass the folder that holds config.json and the safetensors")
    if _looks_like_path(model) or not re.fullmatch(r"[\w.\-]+(/[\w.\-]+)?", model):
        raise InputError(f"model folder {model} does not exist; pass an existing folder or a hub id like Qwen/Qwen3-30B-A3B")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        local = snapshot_download(repo_id=model, revision=revision, allow_patterns=list(HUB_PATTERNS))
    except LocalEntryNotFoundError:
        raise InputError(
            f"{model} is not in the Hugging Face cache and the hub cannot be reached (HF_HUB_OFFLINE or no network); "
            f"download it first with `hf download {model}` or pass a local folder"
        ) from None
    except RevisionNotFoundError:
        raise InputError(f"revision {revision} of {model} does not exist; check --revision") from None
    except GatedRepoError:
        raise InputError(f"{model} is gated; accept its licence on the hub and log in with `hf auth login`") from None
    except RepositoryNotFoundError:
        raise InputError(f"{model} is neither a local folder nor a hub repository; check the name") from None
    return ModelSource(path=Path(local), hub_id=model, revision=revision)


def load_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        raise InputError(f"{folder} has no config.json; pass a Hugging Face model folder")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise InputError(f"{path} is not valid JSON (line {exc.lineno}); restore the file") from None


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "F8_E8M0": "float8_e8m0fnu",
}


@dataclass
class _Entry:
    dtype: str
    shape: list[int]
    start: int  # absolute byte offset in the file
    stop: int


def read_header(path: Path) -> dict[str, _Entry]:
    """Parse a safetensors header; an error naming the file if it is truncated or corrupt."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ValueError("shorter than its header")
            n = int.from_bytes(raw, "little")
            if n <= 0 or 8 + n > size:
                raise ValueError("header runs past the end of the file")
            header = json.loads(f.read(n))
    except (OSError, ValueError) as exc:
        raise InputError(f"safetensors file {path} is truncated or corrupt ({exc}); download it again") from None
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        a, b = info["data_offsets"]
        entries[name] = _Entry(info["dtype"], list(info["shape"]), 8 + n + a, 8 + n + b)
    end = max((e.stop for e in entries.values()), default=8 + n)
    if end > size:
        raise InputError(f"safetensors file {path} is truncated ({size} of {end} bytes); download it again")
    return entries


@dataclass
class Checkpoint:
    """Tensors of a safetensors checkpoint (single file or indexed), read one at a time.

    Each tensor is read with a positioned read into its own buffer, not through a memory
    map: a decomposition touches every byte of a 60 GB checkpoint once, and mapped pages
    would count against resident memory until the map is dropped.
    """

    folder: Path
    weight_map: dict[str, str]
    #: FP8 layout from the folder's config.json (:class:`tuckerize.fp8.Fp8Format`), or None.
    fp8: Any = None
    _headers: dict[str, dict[str, _Entry]] = field(default_factory=dict, repr=False)

    @classmethod
    def open(cls, folder: str | Path) -> "Checkpoint":
        folder = Path(folder)
        index = folder / INDEX_NAME
        if index.is_file():
            try:
                weight_map = dict(json.loads(index.read_text())["weight_map"])
            except (json.JSONDecodeError, KeyError):
                raise InputError(f"{index} is not a valid safetensors index; restore it from the source") from None
        else:
            files = sorted(folder.glob("*.safetensors"))
            if not files:
                raise InputError(f"{folder} holds no safetensors weights (model.safetensors or an index); "
                                 "convert the checkpoint to safetensors first")
            if len(files) > 1:
                raise InputError(f"{folder} has {len(files)} safetensors files but no {INDEX_NAME}; restore the index")
            ckpt = cls(folder=folder, weight_map={}, fp8=read_format(folder))
            ckpt.weight_map = {name: files[0].name for name in ckpt._header(files[0].name)}
            return ckpt
        missing = sorted({f for f in weight_map.values() if not (folder / f).is_file()})
        if missing:
            raise InputError(f"safetensors file {folder / missing[0]} listed in the index is missing; download it again")
        return cls(folder=folder, weight_map=weight_map, fp8=read_format(folder))

    @property
    def files(self) -> list[str]:
        return sorted(set(self.weight_map.values()))

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def _header(self, filename: str) -> dict[str, _Entry]:
        if filename not in self._headers:
            self._headers[filename] = read_header(self.folder / filename)
        return self._headers[filename]

    def _entry(self, name: str) -> _Entry:
        if name not in self.weight_map:
            raise InputError(f"tensor {name} is not in {self.folder}; is the checkpoint complete?")
        filename = self.weight_map[name]
        entry = self._header(filename).get(name)
        if entry is None:
            raise InputError(f"tensor {name} is listed in the index but missing from {self.folder / filename}; "
                             "download the checkpoint again")
        return entry

    def shape(self, name: str) -> list[int]:
        return list(self._entry(name).shape)

    def dtype(self, name: str) -> str:
        return self._entry(name).dtype

    def get(self, name: str, dequantize: bool = False, device: "Any" = None) -> "Any":
        """One tensor, read now, in its stored dtype; with ``dequantize``, an FP8 weight
        comes back in float32 multiplied out by its scale tensor, on ``device``
        (:mod:`tuckerize.fp8`); other tensors are unchanged."""
        import torch

        e = self._entry(name)
        if e.dtype not in _DTYPES:
            raise InputError(f"tensor {name} has dtype {e.dtype}, which tuckerize cannot read")
        dtype = getattr(torch, _DTYPES[e.dtype])
        nbytes = e.stop - e.start
        buf = bytearray(nbytes)
        path = self.folder / self.weight_map[name]
        with open(path, "rb") as f:
            got = f.seek(e.start) == e.start and f.readinto(buf)
        if got != nbytes:
            raise InputError(f"cannot read {name} from {path}: the file is truncated; download it again")
        if nbytes == 0:
            return torch.empty(e.shape, dtype=dtype)
        t = torch.frombuffer(buf, dtype=dtype).reshape(e.shape)
        if dequantize and e.dtype in FP8_DTYPES:
            return dequantize_from(self, name, t, device)
        return t

    def close(self) -> None:
        self._headers.clear()


def layer_of(name: str) -> int | None:
    """Decoder layer index of a tensor name (``model.layers.3.x`` -> 3), else None."""
    m = re.search(r"(?:^|\.)layers\.(\d+)\.", name)
    return int(m.group(1)) if m else None


@contextlib.contextmanager
def atomic_write(path: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it to ``path`` only on success."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json(path: Path, data: Any) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def save_safetensors(tensors: dict[str, Any], path: Path, metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    with atomic_write(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)

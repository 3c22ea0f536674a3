"""Reading Hugging Face checkpoints lazily, and writing files atomically.

* :func:`resolve_model` turns a hub id or a local folder into a local folder
  (huggingface_hub's ``snapshot_download`` with only the files a decomposition
  needs; it honours the HF cache, ``--revision`` and ``HF_HUB_OFFLINE``).
* :class:`Checkpoint` reads ``model.safetensors.index.json`` or a single
  safetensors file and hands out one tensor at a time, each with a positioned
  read of its own bytes: nothing is read until asked for.
* Writing (the one writer every command uses): :func:`atomic_write` writes to a
  temporary name (:func:`tmp_name`) and renames when complete, so an interrupted
  run never leaves a file that looks finished; :func:`write_json`,
  :func:`write_bytes`, :func:`copy_file` and :func:`save_safetensors` go through it.
  An operating-system error while writing (disk full, read-only folder, a path
  below a file, no permission) becomes one :class:`~tuckerize.errors.OutputError`
  line naming the path and what to do (:func:`output_errors`).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from tuckerize.errors import InputError, OutputError
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


def resolve_model(model: str, revision: str | None = None, flag: str = "--model") -> ModelSource:
    """A local folder as is, or a hub id resolved through the Hugging Face cache.

    ``flag`` is the option the user passed it with, for the error messages."""
    path = Path(model).expanduser()
    if path.is_dir():
        return ModelSource(path=path.resolve())
    if path.exists():
        raise InputError(f"{flag} {model} is a file; pass the folder that holds config.json and the safetensors")
    if _looks_like_path(model) or not re.fullmatch(r"[\w.\-]+(/[\w.\-]+)?", model):
        raise InputError(f"{flag.lstrip('-')} folder {model} does not exist; pass an existing folder or a hub id like Qwen/Qwen3-30B-A3B")
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
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        where = f" (line {exc.lineno})" if isinstance(exc, json.JSONDecodeError) else ""
        raise InputError(f"{path} is not valid JSON{where}; restore the file") from None
    if not isinstance(config, dict):
        raise InputError(f"{path} is not a JSON object; restore the file")
    return config


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


#: Bytes per element of each safetensors dtype (the header's byte ranges must agree).
_ITEMSIZE = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4,
    "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}


def read_header(path: Path) -> dict[str, _Entry]:
    """Parse and validate a safetensors header; an error naming the file if it is truncated or corrupt.

    Checked: the header is a JSON object of entries ``{"dtype": str, "shape": [int, ...],
    "data_offsets": [start, stop]}``, each byte range lies inside the file and holds exactly
    ``prod(shape) * itemsize(dtype)`` bytes.
    """
    fix = "download or write it again"
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
        raise InputError(f"safetensors file {path} is truncated or corrupt ({exc}); {fix}") from None
    if not isinstance(header, dict):
        raise InputError(f"safetensors file {path} has a corrupt header (a JSON {type(header).__name__}, "
                         f"not an object); {fix}")
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (a, b) = info["dtype"], info["shape"], info["data_offsets"]
            if not (isinstance(dtype, str) and isinstance(shape, list)
                    and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
                    and all(isinstance(o, int) and not isinstance(o, bool) for o in (a, b)) and 0 <= a <= b):
                raise ValueError
        except (TypeError, KeyError, ValueError):
            raise InputError(f"safetensors file {path} has a corrupt header (entry {name} is malformed); {fix}") from None
        itemsize = _ITEMSIZE.get(dtype)
        if itemsize is not None:
            count = 1
            for d in shape:
                count *= d
            if count * itemsize != b - a:
                raise InputError(f"safetensors file {path} has a corrupt header: {name} is {dtype} {shape} "
                                 f"({count * itemsize} bytes) but its byte range holds {b - a}; {fix}")
        entries[name] = _Entry(dtype, list(shape), 8 + n + a, 8 + n + b)
    end = max((e.stop for e in entries.values()), default=8 + n)
    if end > size:
        raise InputError(f"safetensors file {path} is truncated ({size} of {end} bytes); {fix}")
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
                if not all(isinstance(v, str) for v in weight_map.values()):
                    raise ValueError
            except (ValueError, KeyError, TypeError):
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

    def nbytes(self, name: str) -> int:
        """Bytes ``name`` takes in its file, as stored (from the header; nothing is read)."""
        e = self._entry(name)
        return e.stop - e.start

    def get(self, name: str, dequantize: bool = False, device: "Any" = None) -> "Any":
        """One tensor, read now, in its stored dtype; with ``dequantize``, an FP8 weight
        comes back in float32 multiplied out by its scale tensor, on ``device``
        (:mod:`tuckerize.fp8`); other tensors are unchanged. A factor stored quantised
        (:mod:`tuckerize.quant`, either layout) comes back dequantised, in float32."""
        import torch

        if name not in self.weight_map and (f"{name}.qweight" in self.weight_map or f"{name}.qcodes" in self.weight_map):
            from tuckerize.quant import read_dequantised

            return read_dequantised(self, name)
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


#: errno -> what to do about it, for :func:`output_error`.
_WRITE_FIXES = {
    errno.ENOSPC: ("no space left on the device", "free some space or choose another --out"),
    errno.EDQUOT: ("disk quota exceeded", "free some space or choose another --out"),
    errno.EROFS: ("the file system is read-only", "choose a writable --out"),
    errno.EACCES: ("permission denied", "choose a folder you can write to with --out"),
    errno.EPERM: ("operation not permitted", "choose a folder you can write to with --out"),
    errno.ENOTDIR: ("a part of the path is a file, not a folder", "choose an --out below a folder"),
    errno.EEXIST: ("a part of the path is a file, not a folder", "choose an --out below a folder"),
    errno.EISDIR: ("it is a folder", "choose another --out"),
}


#: Errors that only a write raises (the others may come from reading too).
_WRITE_ONLY = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}


def output_error(exc: OSError, path: Path | str | None = None) -> OutputError | None:
    """The one-line error for an ``OSError`` raised while writing ``path`` (or, with no
    ``path``, anywhere: the CLI's last resort), or None when it is not one a user can fix
    (a bug: re-raise it)."""
    fix = _WRITE_FIXES.get(exc.errno or 0)
    if fix is None or (path is None and exc.filename is None):
        return None
    what, todo = fix
    verb = "write" if path is not None or exc.errno in _WRITE_ONLY else "use"
    return OutputError(f"cannot {verb} {exc.filename or path}: {what}; {todo}")


@contextlib.contextmanager
def output_errors(path: Path | str) -> Iterator[None]:
    """Turn disk-full, read-only and not-a-folder errors of writes below ``path`` into one
    :class:`~tuckerize.errors.OutputError` line."""
    try:
        yield
    except OSError as exc:
        mapped = output_error(exc, path)
        if mapped is None:
            raise
        raise mapped from None


#: ``.NAME.tmp-PID``: the temporary file of :func:`atomic_write` (and of every streaming
#: writer of the package) while NAME is being written by process PID.
TMP_RE = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>\d+)$")


def tmp_name(path: Path) -> Path:
    """The temporary path :func:`atomic_write` writes ``path`` under (matches :data:`TMP_RE`)."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


@contextlib.contextmanager
def atomic_write(path: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it to ``path`` only on success.

    The temporary file is removed on any failure; an ``OSError`` a user can fix (disk
    full, read-only folder, ``path`` below a file) becomes an
    :class:`~tuckerize.errors.OutputError` naming the path.
    """
    path = Path(path)
    tmp = tmp_name(path)
    try:
        with output_errors(path):
            yield tmp
            os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def write_bytes(path: Path, data: bytes) -> None:
    with atomic_write(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def write_json(path: Path, data: Any) -> None:
    write_bytes(path, (json.dumps(data, indent=2, sort_keys=False) + "\n").encode())


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode())


def copy_file(src: Path, path: Path) -> None:
    """Copy ``src`` to ``path`` atomically."""
    import shutil

    with atomic_write(path) as tmp:
        shutil.copyfile(src, tmp)


def safetensors_header(tensors: dict[str, Any], metadata: dict[str, str] | None = None) -> tuple[bytes, list[str]]:
    """The 8-byte length and JSON header safetensors writes for ``tensors``, and the order
    their data follow in. The order is safetensors' own (by dtype, then name), asked of it
    with empty tensors of the same names and dtypes, so the file is byte-identical to
    ``safetensors.torch.save``'s; the header lists shapes and byte offsets, padded with
    spaces to 8 bytes as safetensors pads it."""
    import struct

    import torch
    from safetensors.torch import save

    probe = save({k: torch.empty(0, dtype=v.dtype) for k, v in tensors.items()}, metadata=metadata)
    n = struct.unpack("<Q", probe[:8])[0]
    probed = json.loads(probe[8:8 + n])
    order = [k for k in probed if k != "__metadata__"]
    header: dict[str, Any] = {"__metadata__": probed["__metadata__"]} if "__metadata__" in probed else {}
    offset = 0
    for k in order:
        t = tensors[k]
        size = t.numel() * t.element_size()
        header[k] = {"dtype": probed[k]["dtype"], "shape": list(t.shape),
                     "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text, order


def save_safetensors(tensors: dict[str, Any], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` as a safetensors file through :func:`atomic_write`, streamed: the
    header, then each tensor's bytes straight from its memory (safetensors' own ``save`` and
    ``save_file`` copy every tensor to bytes first, and ``save`` the whole file again: three
    times the non-expert unit of a large vocabulary, GBs, at the peak). The bytes are
    safetensors' own (:func:`safetensors_header`); a full disk is an ``OSError`` here, which
    :func:`atomic_write` names."""
    import torch

    head, order = safetensors_header(tensors, metadata)
    with atomic_write(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(head)
            for k in order:
                t = tensors[k].detach().cpu().contiguous()
                if t.numel():
                    f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
            f.flush()
            os.fsync(f.fileno())

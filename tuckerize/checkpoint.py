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


@dataclass
class Checkpoint:
    """Lazy access to the tensors of a safetensors checkpoint (single file or indexed)."""

    folder: Path
    weight_map: dict[str, str]
    _handles: dict[str, Any] = field(default_factory=dict, repr=False)

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
            weight_map = {}
            ckpt = cls(folder=folder, weight_map={})
            for name in ckpt._handle(files[0].name).keys():
                weight_map[name] = files[0].name
            ckpt.weight_map = weight_map
            return ckpt
        missing = sorted({f for f in weight_map.values() if not (folder / f).is_file()})
        if missing:
            raise InputError(f"safetensors file {folder / missing[0]} listed in the index is missing; download it again")
        return cls(folder=folder, weight_map=weight_map)

    @property
    def files(self) -> list[str]:
        return sorted(set(self.weight_map.values()))

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def _handle(self, filename: str) -> Any:
        if filename not in self._handles:
            from safetensors import SafetensorError, safe_open

            path = self.folder / filename
            try:
                self._handles[filename] = safe_open(str(path), framework="pt")
            except (SafetensorError, OSError) as exc:
                raise InputError(
                    f"safetensors file {path} is truncated or corrupt ({str(exc).splitlines()[0][:80]}); download it again"
                ) from None
        return self._handles[filename]

    def shape(self, name: str) -> list[int]:
        return list(self._handle(self.weight_map[name]).get_slice(name).get_shape())

    def dtype(self, name: str) -> str:
        return str(self._handle(self.weight_map[name]).get_slice(name).get_dtype())

    def get(self, name: str) -> "Any":
        """One tensor, read now, in its stored dtype."""
        if name not in self.weight_map:
            raise InputError(f"tensor {name} is not in {self.folder}; is the checkpoint complete?")
        from safetensors import SafetensorError

        filename = self.weight_map[name]
        try:
            return self._handle(filename).get_tensor(name)
        except (SafetensorError, OSError) as exc:
            raise InputError(
                f"cannot read {name} from {self.folder / filename} ({str(exc).splitlines()[0][:80]}): "
                "the file is truncated or corrupt; download it again"
            ) from None

    def close(self) -> None:
        self._handles.clear()


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

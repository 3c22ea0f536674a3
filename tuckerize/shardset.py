"""The shard-set format and its reader: what ``tuckerize shard`` writes, as the runtime reads it.

A shard set is a folder::

    config.json, tokenizer files         shared by all ranks (config has a "shard" section)
    rank-00000-of-00004/model-000LL-of-000NN.safetensors   rank 0's slices, one file per unit
    rank-00000-of-00004/model.safetensors.index.json
    ...
    shard_manifest.json                  written last: layout, tp, per-rank files and
                                         sha256, each tensor's split, source identity

This module owns those names (:data:`SHARD_MANIFEST`, :func:`rank_dir`), the manifest's
structure check (:func:`check_shard_manifest`), one rank's integrity check
(:func:`verify_shard_rank`), the identity of the checkpoint a shard set was cut from
(:func:`shard_source_manifest`, :func:`tucker_manifest`) and the reader
(:class:`ShardSet`, opened by the runtime's loader). The writer is
:mod:`tuckerize.shard.sharding`; how each tensor is split is the runtime layers' rule.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from tuckerize.checkpoint import load_config, sha256_file
from tuckerize.errors import IntegrityError, ShardError
from tuckerize.format import MANIFEST_NAME, load_manifest
from tuckerize.integrity import verify_files
from tuckerize.progress import Progress

SHARD_MANIFEST = "shard_manifest.json"


def rank_dir(rank: int, tp: int) -> str:
    return f"rank-{rank:05d}-of-{tp:05d}"


_SHARD_FIX = "run `tuckerize shard` again (with --overwrite)"


def check_shard_manifest(path: Path) -> dict[str, Any]:
    """A shard set's ``shard_manifest.json``, its structure checked: one-line errors if damaged."""
    path = Path(path)
    if not path.is_file():
        raise ShardError(f"{path.parent} has no {path.name}: not a finished shard set; {_SHARD_FIX}")
    manifest = load_manifest(path, _SHARD_FIX)
    try:
        tp = int(manifest["tp"])
        str(manifest["layout"])
        ranks = manifest["ranks"]
        ok = isinstance(ranks, list) and len(ranks) == tp and all(
            isinstance(r, dict) and isinstance(r["dir"], str) and isinstance(r["files"], dict)
            and all(isinstance(i, dict) and "bytes" in i and "sha256" in i for i in r["files"].values())
            for r in ranks)
        if not ok or not isinstance(manifest.get("source", {}), dict):
            raise ValueError
    except (KeyError, TypeError, ValueError):
        raise IntegrityError(f"{path} is damaged (missing or malformed tp, layout, ranks or files); {_SHARD_FIX}") from None
    return manifest


def verify_shard_rank(shard_folder: str | Path, rank_entry: Mapping[str, Any], *, verify: bool = True,
                      progress: Progress | None = None) -> None:
    """Check one rank's files of a shard set against ``shard_manifest.json`` (see :func:`verify_files`)."""
    verify_files(Path(shard_folder) / rank_entry["dir"], rank_entry["files"], verify=verify,
                 manifest_name=SHARD_MANIFEST, fix=_SHARD_FIX, error=ShardError, progress=progress)


def shard_source_manifest(shard_folder: str | Path, manifest: Mapping[str, Any]) -> dict[str, Any] | None:
    """The Tucker manifest of the checkpoint a shard set was cut from, checked against the
    identity the shard set recorded (the sha256 of that manifest). None when the source folder
    is gone; an :class:`IntegrityError` when it now holds another decomposition."""
    source = manifest.get("source") or {}
    path = Path(str(source.get("path", ""))) / MANIFEST_NAME
    if not source.get("path") or not path.is_file():
        return None
    recorded = source.get("manifest_sha256")
    if recorded and sha256_file(path) != recorded:
        raise IntegrityError(
            f"shard set {shard_folder} was cut from {source['path']}, which now holds another decomposition "
            f"(its {MANIFEST_NAME} changed); reshard with `tuckerize shard {source['path']} --overwrite`, "
            "or pass --baseline to evaluate the shard set as it is")
    return load_manifest(path, "rerun `tuckerize decompose`")


@dataclass
class ShardSet:
    """A shard set on disk, opened for one rank."""

    folder: Path
    manifest: dict[str, Any]
    config: dict[str, Any]

    @classmethod
    def open(cls, folder: str | Path) -> "ShardSet":
        folder = Path(folder)
        path = folder / SHARD_MANIFEST
        if not path.is_file():
            raise ShardError(f"{folder} has no {SHARD_MANIFEST}: not a finished shard set; run `tuckerize shard` again")
        manifest = check_shard_manifest(path)
        return cls(folder=folder, manifest=manifest, config=load_config(folder))

    @property
    def tp(self) -> int:
        return int(self.manifest["tp"])

    @property
    def layout(self) -> str:
        return str(self.manifest["layout"])

    def rank_folder(self, rank: int, world: int, verify: bool = True) -> Path:
        """This rank's folder, after checking the world size and the files' checksums."""
        if world != self.tp:
            raise ShardError(
                f"shard set {self.folder} was written for tp={self.tp} but {world} processes were started; "
                f"launch with torchrun --nproc_per_node {self.tp} or reshard with --tp {world}"
            )
        entry = self.manifest["ranks"][rank]
        folder = self.folder / entry["dir"]
        verify_shard_rank(self.folder, entry, verify=verify)
        return folder


def tucker_manifest(folder: Path) -> dict[str, Any] | None:
    """The Tucker manifest of ``folder``, or of the checkpoint a shard set was cut from
    (checked against the identity the shard set recorded)."""
    if (folder / SHARD_MANIFEST).is_file():
        return shard_source_manifest(folder, check_shard_manifest(folder / SHARD_MANIFEST))
    path = folder / MANIFEST_NAME
    return load_manifest(path, "rerun `tuckerize decompose`") if path.is_file() else None

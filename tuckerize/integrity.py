"""Integrity of checkpoints on load: every file against the size and sha256 its manifest records.

Public API (stable: the CLI, the runtime loader, the shard writer and the vLLM plugin call it;
a shard set's own checks, built on :func:`verify_files`, are in :mod:`tuckerize.shardset`):

* :func:`verify_checkpoint` checks an unsharded Tucker checkpoint folder against
  ``tuckerize_manifest.json``'s ``files`` (``{filename: {"bytes": int, "sha256": str}}``).
* :func:`verify_files` checks any set of ``{filename: {"bytes", "sha256"}}`` in one folder
  (a shard set's rank folder uses it).
* :func:`manifest_sha256` is a checkpoint's identity (the sha256 of its manifest file), which
  shard sets record and check.

Fast by default: sizes are always compared; a file's sha256 is computed once and the result
cached next to it in ``.tuckerize-verified.json``, keyed by the file's size, mtime_ns,
ctime_ns and inode, so that any write to the file (or a copy, or a replacement) makes it be
hashed again. The cache is written atomically; a folder that cannot be written is verified
anyway, without caching. ``verify=False`` keeps the size check only (``--no-verify``).

A mismatch raises :class:`tuckerize.errors.IntegrityError`, one line naming the file and
what to do.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from tuckerize.checkpoint import sha256_file, write_json
from tuckerize.errors import IntegrityError, OutputError, TuckerizeError
from tuckerize.format import MANIFEST_NAME, load_manifest
from tuckerize.progress import Progress, ensure

#: Hash cache written beside the files it covers (a file of ours, like the manifest).
VERIFY_CACHE_NAME = ".tuckerize-verified.json"
_CACHE_VERSION = 1


def _stat_key(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def _read_cache(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # absent or damaged: hash again
    if not isinstance(data, dict) or data.get("version") != _CACHE_VERSION or not isinstance(data.get("files"), dict):
        return {}
    return data["files"]


def _write_cache(path: Path, files: dict[str, Any]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, {"version": _CACHE_VERSION, "files": files})
    except (OSError, OutputError):
        pass  # read-only folder, full disk: verification still happened, it is only not remembered


def verify_files(
    folder: str | Path,
    entries: Mapping[str, Mapping[str, Any]],
    *,
    verify: bool = True,
    manifest_name: str,
    fix: str,
    error: type[TuckerizeError] = IntegrityError,
    cache_path: Path | None = None,
    progress: Progress | None = None,
    skip_hint: str = "--no-verify skips this check",
) -> None:
    """Check ``folder/<name>`` against ``entries[name] = {"bytes": int | None, "sha256": str}``.

    ``manifest_name`` names the file the entries come from and ``fix`` says what to do, both
    for the error message; ``error`` is the exception type raised. Sizes always (where
    recorded); sha256s when ``verify``, cached in ``cache_path`` (default
    ``folder/.tuckerize-verified.json``; see the module docstring). ``skip_hint`` ends a
    sha256 mismatch's message: how to skip the check where the caller runs (a flag, or an
    environment variable inside vLLM).
    """
    folder = Path(folder)
    progress = ensure(progress)
    cache_path = folder / VERIFY_CACHE_NAME if cache_path is None else Path(cache_path)
    cache = _read_cache(cache_path) if verify else {}
    changed = False
    todo = []
    for name, info in entries.items():
        path = folder / name
        if not path.is_file():
            raise error(f"{path} is missing (listed in {manifest_name}); {fix}")
        size = path.stat().st_size
        if info.get("bytes") is not None and size != int(info["bytes"]):
            raise error(f"{path} is corrupted: {size} bytes where {manifest_name} records {info['bytes']} "
                        f"(truncated or replaced); {fix}")
        if verify:
            hit = cache.get(name)
            if not (isinstance(hit, dict) and hit.get("sha256") == info["sha256"] and hit.get("stat") == _stat_key(path)):
                todo.append((name, path, info))
    if not todo:
        return
    progress.start("verify", len(todo))
    for name, path, info in todo:
        before = _stat_key(path)
        digest = sha256_file(path)
        if digest != info["sha256"]:
            raise error(f"{path} is corrupted: its sha256 does not match the one recorded in {manifest_name} "
                        f"(damaged or replaced); {fix}; {skip_hint}")
        if _stat_key(path) == before:  # not written to while it was hashed
            cache[name] = {"sha256": digest, "stat": before}
            changed = True
        progress.advance("verify", file=name)
    progress.finish("verify")
    if changed:
        _write_cache(cache_path, cache)


def manifest_sha256(folder: str | Path) -> str:
    """Identity of a Tucker checkpoint: the sha256 of its ``tuckerize_manifest.json``."""
    return sha256_file(Path(folder) / MANIFEST_NAME)


def verify_checkpoint(folder: str | Path, *, verify: bool = True, progress: Progress | None = None,
                      skip_hint: str = "--no-verify skips this check") -> dict[str, Any]:
    """Check an unsharded Tucker checkpoint against its manifest; returns the manifest.

    Every file in the manifest's ``files`` (the safetensors; plus ``side_files`` where a
    manifest records them, same form) must exist with the recorded size and, when ``verify``,
    the recorded sha256 (computed once per file and cached, see the module docstring).
    Raises :class:`~tuckerize.errors.IntegrityError` naming the first damaged file, or
    :class:`~tuckerize.errors.InputError` if ``folder`` is not a finished Tucker checkpoint.
    """
    folder = Path(folder)
    fix = "rerun `tuckerize decompose` into a new folder (or restore the file)"
    manifest = load_manifest(folder / MANIFEST_NAME,
                             "it is not a finished Tucker checkpoint; rerun `tuckerize decompose`")
    entries: dict[str, Mapping[str, Any]] = {}
    for key in ("files", "side_files"):
        group = manifest.get(key) or {}
        if not isinstance(group, dict):
            raise IntegrityError(f"{folder / MANIFEST_NAME} is damaged ('{key}' is not an object); {fix}")
        for name, info in group.items():
            if not (isinstance(info, dict) and "bytes" in info and "sha256" in info):
                raise IntegrityError(f"{folder / MANIFEST_NAME} is damaged (entry {name} has no bytes/sha256); {fix}")
            entries[str(info.get("file", name))] = info
    verify_files(folder, entries, verify=verify, manifest_name=MANIFEST_NAME, fix=fix, progress=progress,
                 skip_hint=skip_hint)
    return manifest

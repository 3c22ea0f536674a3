"""The baseline cache: the original model's scores on a text, kept per model, text and settings.

Files live under ``$TUCKERIZE_CACHE`` (default ``~/.cache/tuckerize``, read when used):
``baselines/<key>.safetensors`` (:func:`baseline_key`: the model folder's files by name, size
and mtime, the text's sha256, seqlen, which windows (the first one scored and how many), dtype,
top-k and the tuckerize version), written atomically as safetensors tensors plus a JSON object
in the metadata (never a pickle; it records the windows too), and ``verified/`` (the sha256
cache of a baseline checked against the source a Tucker manifest records). A cached baseline
that is absent, truncated, damaged, of other shapes or of other windows is a miss.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from tuckerize.checkpoint import read_header, save_safetensors
from tuckerize.version import __version__

_CACHE_TENSORS = ("nll", "top1", "lp_top", "idx_top")


def cache_root() -> Path:
    """``$TUCKERIZE_CACHE``, or ``~/.cache/tuckerize``."""
    return Path(os.environ.get("TUCKERIZE_CACHE", Path.home() / ".cache" / "tuckerize"))


def baseline_path(baseline: str, text_sha: str, seqlen: int, windows: tuple[int, int], dtype: str, topk: int) -> Path:
    """Where the scored baseline of these inputs is cached; ``windows``: (first window, count)."""
    key = baseline_key(baseline, text_sha, seqlen, windows, dtype, topk)
    return cache_root() / "baselines" / f"{key}.safetensors"


def verified_cache(folder: Path) -> Path:
    """The sha256 cache of a baseline folder checked against a recorded source."""
    return cache_root() / "verified" / (hashlib.sha256(str(folder).encode()).hexdigest()[:24] + ".json")


def baseline_key(baseline: str, text_sha: str, seqlen: int, windows: tuple[int, int], dtype: str, topk: int) -> str:
    folder = Path(baseline)
    ident = [str(folder.resolve())]
    for f in sorted(folder.glob("*.safetensors")) + [folder / "config.json"]:
        if f.is_file():
            st = f.stat()
            ident.append(f"{f.name}:{st.st_size}:{int(st.st_mtime)}")
    blob = json.dumps([ident, text_sha, seqlen, list(windows), dtype, topk, __version__])
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def load_cached_baseline(path: Path, windows: tuple[int, int], seqlen: int, topk: int) -> dict[str, Any] | None:
    """A baseline cached by :func:`save_cached_baseline` for ``windows`` (first window, count),
    or None when it is absent, truncated, corrupt, of other shapes or records other windows
    (then it is recomputed and written again). Never unpickles: safetensors tensors plus a
    JSON object in the file's metadata."""
    from safetensors.torch import load

    if not path.is_file():
        return None
    try:
        read_header(path)  # validated first: a damaged header is a miss, not a crash
        blob = path.read_bytes()  # read whole, not memory-mapped: a file truncated later cannot fault
        n = int.from_bytes(blob[:8], "little")
        meta = json.loads(json.loads(blob[8:8 + n])["__metadata__"]["tuckerize_baseline"])
        tensors = load(blob)
        base = {k: tensors[k] for k in _CACHE_TENSORS}
        seconds, vocab, recorded = float(meta["seconds"]), int(meta["vocab"]), list(meta["windows"])
    except Exception:  # safetensors raises its own error types for a damaged file
        return None
    n_windows, k = windows[1], min(topk, vocab)
    want = {"nll": (n_windows, seqlen - 1), "top1": (n_windows, seqlen - 1), "lp_top": (n_windows, seqlen - 1, k),
            "idx_top": (n_windows, seqlen - 1, k)}
    if recorded != list(windows) or any(tuple(base[name].shape) != shape for name, shape in want.items()):
        return None
    return {**base, "seconds": seconds, "vocab": vocab}


def save_cached_baseline(path: Path, base: dict[str, Any], windows: tuple[int, int]) -> None:
    """Write the scored baseline of ``windows`` (first window, count) atomically as safetensors
    with a JSON metadata entry."""
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"tuckerize_baseline": json.dumps({"seconds": base["seconds"], "vocab": base["vocab"],
                                               "windows": list(windows), "version": __version__})}
    save_safetensors({k: base[k] for k in _CACHE_TENSORS}, path, metadata=meta)

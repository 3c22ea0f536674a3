"""Rich progress bars and tables for the CLI (the library itself never prints)."""

from __future__ import annotations

import json
import math
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True)

LABELS = {
    "hash": "hashing source files",
    "decompose": "decomposing experts",
    "shard": "writing shards",
    "eval": "evaluating",
    "calibrate": "calibrating",
    "allocate": "allocating ranks",
    "verify": "verifying checksums",
}


class RichProgress:
    """Implements :class:`tuckerize.progress.Progress` with one rich bar per task."""

    def __init__(self, enabled: bool = True) -> None:
        self.bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=console,
            disable=not enabled,
        )
        self.tasks: dict[str, Any] = {}

    def __enter__(self) -> "RichProgress":
        self.bar.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if exc[0] is not None:
            # Leaving on an error: drop the bars so that the one-line "error: ..." is all that
            # stderr shows (rich otherwise re-renders them, plus a blank line, after the error
            # when stderr is not a terminal).
            if not self.bar.disable:
                self.bar.live.transient = True
                self.bar.live.stop()
            return
        self.bar.__exit__(*exc)

    def start(self, task: str, total: int) -> None:
        self.tasks[task] = self.bar.add_task(LABELS.get(task, task), total=total, info="")

    def advance(self, task: str, n: int = 1, **info: Any) -> None:
        parts = []
        if info.get("layer") is not None and info["layer"] >= 0:
            parts.append(f"layer {info['layer']}")
        if "projection" in info:
            parts.append(info["projection"])
        if "error" in info:
            parts.append(f"err {info['error']:.4f}")
        if info.get("skipped"):
            parts.append("(done before)")
        if "file" in info:
            parts.append(str(info["file"]))
        self.bar.update(self.tasks[task], advance=n, info=" ".join(parts))

    def finish(self, task: str) -> None:
        self.bar.update(self.tasks[task], info="")


def size(n: float) -> str:
    """Bytes as a short size: ``812.0 KiB``, ``3.00 MiB``, ``57.2 GiB``."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n / 2**10:.1f} KiB"


def bytes_line(b: dict, what: str = "expert bytes") -> str:
    """One line of a ``bytes`` record (the decompose manifest's, the shard manifest's):
    the stored routed-expert bytes against the source as stored and against bf16 dense
    experts; the source part is left out for checkpoints written before it was recorded."""
    parts = [f"{what}: {size(b['experts_stored'])} stored"]
    if b.get("experts_source"):
        stored = "/".join((b.get("source_dtype") or {}).get("stored", [])) or "as stored"
        parts.append(f"{b['ratio_to_source']:.1%} of the source's {size(b['experts_source'])} ({stored})")
    parts.append(f"{b['ratio_to_bf16_dense']:.1%} of {size(b['experts_dense_bf16'])} as bf16 dense experts")
    return parts[0] + ": " + ", ".join(parts[1:])


def finite(data: Any) -> Any:
    """``data`` with every non-finite float (inf, -inf, nan) replaced by None: JSON has no
    Infinity or NaN, and strict parsers reject Python's bare ``Infinity``. Reports write null
    for a value that overflowed (e.g. a perplexity of exp(1000))."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {k: finite(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [finite(v) for v in data]
    return data


def to_json(data: Any) -> str:
    """Strict JSON text (``allow_nan=False`` after :func:`finite`), indented, ending in a newline."""
    return json.dumps(finite(data), indent=2, default=str, allow_nan=False) + "\n"


def print_json(data: Any) -> None:
    print(to_json(data), end="")

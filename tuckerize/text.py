"""Text sources: the one reader of ``decompose --calibration`` and ``eval --text``.

Every name has one meaning, whichever command reads it:

``demo-calibration``  the demo's calibration text (``tuckerize/demo/calibration.txt``, cut
                      from the plays the demo models were trained on)
``demo-heldout``      the demo's held-out text (``tuckerize/demo/model/heldout.txt``, never
                      trained on, disjoint from the calibration text)
``wikitext2``         WikiText-2 raw, test split (``hf:wikitext:wikitext-2-raw-v1:test``)
``hf:NAME[:CONFIG[:SPLIT]]``  a Hugging Face dataset's ``text`` column (split default
                      ``train``), through the optional ``datasets`` package
a ``.jsonl`` file     its lines' ``"text"`` fields, joined by blank lines
a folder              its ``.txt/.md/.text/.raw`` files (recursive, sorted), joined by blank lines
any other file        its text

``demo`` is shorthand for the demo text that fits the command (:data:`DEMO_SHORTHAND`):
``demo-calibration`` for ``--calibration``, ``demo-heldout`` for ``--text``, so that the
demo never evaluates on what it calibrated on; the label records the full name.

Files are read as UTF-8. A file whose first bytes hold a NUL byte or are not UTF-8 is
refused as binary (one line naming the file); later undecodable bytes are replaced.
"""

from __future__ import annotations

import codecs
import json
from pathlib import Path
from typing import NamedTuple

from tuckerize.errors import CalibrationError, InputError, TuckerizeError

DEMO_FOLDER = Path(__file__).parent / "demo"
NAMED_FILES = {
    "demo-calibration": DEMO_FOLDER / "calibration.txt",
    "demo-heldout": DEMO_FOLDER / "model" / "heldout.txt",
}
WIKITEXT2 = "hf:wikitext:wikitext-2-raw-v1:test"
#: ``demo`` for each use (``use`` of :func:`read_text`).
DEMO_SHORTHAND = {"calibration": "demo-calibration", "eval": "demo-heldout"}
TEXT_SUFFIXES = (".txt", ".md", ".text", ".raw")
#: Bytes sniffed for binary content.
SNIFF_BYTES = 8192

_USES = {"calibration": ("--calibration", CalibrationError), "eval": ("--text", InputError)}


class Text(NamedTuple):
    """A loaded text and the label recorded for it (the source's full name or path)."""

    text: str
    label: str


def read_text(spec: str | Path, use: str = "calibration") -> Text:
    """The text named by ``spec`` (module docstring). ``use``: ``"calibration"`` or
    ``"eval"``: which option the error messages name (``--calibration``/``--text``), the
    error type (:class:`CalibrationError`/:class:`InputError`) and what ``demo`` means."""
    option, error = _USES[use]
    src = str(spec)
    src = DEMO_SHORTHAND[use] if src == "demo" else src
    if src in NAMED_FILES:
        return Text(_read_file(NAMED_FILES[src], option, error), src)
    if src in ("wikitext2", "wikitext-2"):
        return Text(_hf_dataset_text(WIKITEXT2[3:], option, error, keep_empty=True), "wikitext2")
    if src.startswith("hf:"):
        return Text(_hf_dataset_text(src[3:], option, error), src)
    path = Path(src).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
        if not files:
            raise error(f"{option} folder {path} holds no {'/'.join(TEXT_SUFFIXES)} files; "
                        "pass a text file or a folder of them")
        return Text("\n\n".join(_read_file(p, option, error) for p in files), str(path))
    if not path.is_file():
        raise error(f"{option} {src} does not exist; pass a text file, a folder of .txt files, a .jsonl file "
                    f"with a 'text' field, hf:DATASET, wikitext2, {', '.join(NAMED_FILES)} or demo")
    raw = _read_file(path, option, error)
    if path.suffix != ".jsonl":
        return Text(raw, str(path))
    parts = []
    for n, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            parts.append(str(json.loads(line)["text"]))
        except (json.JSONDecodeError, KeyError, TypeError):
            raise error(f"{path} line {n} is not a JSON object with a 'text' field; fix the file") from None
    return Text("\n\n".join(parts), str(path))


def _read_file(path: Path, option: str, error: type[TuckerizeError]) -> str:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise error(f"{option} {path} cannot be read ({exc.strerror or type(exc).__name__}); "
                    "check the path and its permissions") from None
    if is_binary(data[:SNIFF_BYTES]):
        raise error(f"{option} {path} is a binary file, not text; pass a UTF-8 text file")
    return data.decode("utf-8", errors="replace")


def is_binary(head: bytes) -> bool:
    """Whether the first bytes of a file are not UTF-8 text: a NUL byte, or bytes that
    are not UTF-8 (a multi-byte character cut at the end of ``head`` is not held against it)."""
    if b"\x00" in head:
        return True
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
    except UnicodeDecodeError:
        return True
    return False


def _hf_dataset_text(spec: str, option: str, error: type[TuckerizeError], keep_empty: bool = False) -> str:
    """The ``text`` column joined by blank lines; ``keep_empty`` keeps empty rows (WikiText-2's
    perplexity convention: its rows joined as published)."""
    parts = spec.split(":")
    name, config, split = parts[0], (parts[1] if len(parts) > 1 and parts[1] else None), (
        parts[2] if len(parts) > 2 and parts[2] else "train")
    try:
        import datasets  # type: ignore[import-not-found]
    except ImportError:
        raise error(f"{option} hf:{spec} needs the 'datasets' package: pip install datasets "
                    "(or pass a local text file)") from None
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as exc:  # noqa: BLE001 - any loader failure (offline, no cache, bad name) is the user's to fix
        raise error(f"{option}: dataset {spec} could not be loaded ({type(exc).__name__}: "
                    f"{str(exc).splitlines()[0] if str(exc) else ''}); connect to the hub once to cache it, "
                    "check the name, or pass a local text file") from None
    if "text" not in ds.column_names:
        raise error(f"{option}: dataset {spec} has no 'text' column (columns: {', '.join(ds.column_names)})")
    return "\n\n".join(t for t in ds["text"] if t or keep_empty)


__all__ = ["DEMO_SHORTHAND", "NAMED_FILES", "Text", "is_binary", "read_text"]

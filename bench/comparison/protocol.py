"""The protocol every row of the comparison shares: which models, which text, which splits.

Text: the calibration text is ``tuckerize/demo/calibration.txt`` (cut from the training plays);
each model folder's ``heldout.txt`` (plays never trained on) is tokenised whole and cut into
199 windows of 256 tokens: windows 0-49 are the SELECTION split (every setting chosen by the
bench is chosen on it), windows 50-198 the REPORT split (the tables). No setting is chosen on
the report split.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

MODELS = {"qwen3": REPO / "tuckerize" / "demo" / "model", "mixtral": REPO / "tuckerize" / "demo" / "mixtral"}
OUT = REPO / "bench" / "out"
BASELINES = REPO / "bench" / "baselines"
SEQLEN = 256
SELECT = 50  # windows [0, SELECT) choose settings; the rest are reported
KL_TOPK = 256
SAMPLES = 128  # calibration windows of SEQLEN tokens (as bench/calibration.py)
FEAT_TOKENS = 512  # calibration tokens per layer whose outputs describe an expert for clustering


def add_models(specs: list[str]) -> list[str]:
    """``KEY=FOLDER`` entries into ``MODELS`` (a folder written by scripts/train_demo.py: its
    model.safetensors, tokenizer and heldout.txt). Returns the keys."""
    keys = []
    for spec in specs:
        key, sep, folder = spec.partition("=")
        path = Path(folder).expanduser().resolve()
        if not sep or not key or key in ("qwen3", "mixtral"):
            raise SystemExit(f"--model-folder {spec!r}: give KEY=FOLDER with a new KEY (not qwen3 or mixtral)")
        missing = [f for f in ("config.json", "model.safetensors", "heldout.txt") if not (path / f).is_file()]
        if missing:
            raise SystemExit(f"--model-folder {spec!r}: {path} lacks {', '.join(missing)}; "
                             "train it with scripts/train_demo.py --out FOLDER")
        MODELS[key] = path
        keys.append(key)
    return keys

"""The embedded demo model: a small Qwen3-MoE trained on Shakespeare by scripts/train_demo.py.

It ships inside the package (``tuckerize/demo/model/``) with its tokenizer and a
held-out text it never saw in training, so the demo and the tests run offline.
"""

from __future__ import annotations

from pathlib import Path

DEMO_NAME = "demo"
DEMO_DIR = Path(__file__).parent / "model"


def demo_path() -> Path:
    return DEMO_DIR


def heldout_text_path() -> Path:
    return DEMO_DIR / "heldout.txt"


def resolve_demo(model: str) -> str:
    """``"demo"`` names the embedded model; anything else is returned unchanged."""
    return str(DEMO_DIR) if model == DEMO_NAME else model

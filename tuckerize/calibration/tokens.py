"""Calibration windows from a text: tokenized whole, cut into windows, evenly spaced.

The text comes from :func:`tuckerize.text.read_text` (``--calibration``); this module owns
how it becomes token ids ``[samples, seqlen]`` and the text's fingerprint.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from tuckerize.errors import CalibrationError


def calibration_tokens(text: str, tokenizer_folder: str | Path, samples: int, seqlen: int) -> torch.Tensor:
    """``samples`` windows of ``seqlen`` tokens ``[samples, seqlen]``: the text is tokenized
    whole, cut into non-overlapping windows, and windows evenly spaced over the text are
    taken (deterministic, and covering the whole text rather than its beginning)."""
    if samples < 1 or seqlen < 2:
        raise CalibrationError(f"--samples {samples} --seqlen {seqlen}: need at least 1 sample of at least 2 tokens")
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(tokenizer_folder))
    except Exception as exc:  # noqa: BLE001
        raise CalibrationError(f"cannot load the tokenizer of {tokenizer_folder} ({type(exc).__name__}); "
                               "calibration needs the model's tokenizer files next to config.json") from None
    ids = tok(text, add_special_tokens=False, verbose=False)["input_ids"]
    windows = len(ids) // seqlen
    if windows < samples:
        raise CalibrationError(f"calibration text has {len(ids):,} tokens: {windows} windows of {seqlen}, fewer than "
                               f"--samples {samples}; give more text or lower --samples/--seqlen")
    starts = torch.linspace(0, windows - 1, samples).round().long() * seqlen
    t = torch.tensor(ids, dtype=torch.long)
    return torch.stack([t[s : s + seqlen] for s in starts.tolist()])


def text_sha256(text: str) -> str:
    """The calibration text's fingerprint (its UTF-8 bytes), stored with the statistics."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


__all__ = ["calibration_tokens", "text_sha256"]

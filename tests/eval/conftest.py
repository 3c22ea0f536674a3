"""Fixtures for the eval tests: a private baseline cache per test, a tiny Qwen3-MoE with
its Tucker checkpoints and a text it can tokenise, the demo model's Tucker checkpoints,
and an in-process CLI runner."""

from __future__ import annotations

from pathlib import Path

import pytest

import model_refs as M
import tucker_refs as R


@pytest.fixture(autouse=True)
def eval_cache(tmp_path, monkeypatch) -> Path:
    """A fresh baseline cache folder for each test (never the user's ~/.cache)."""
    root = tmp_path / "tuckerize-cache"
    monkeypatch.setenv("TUCKERIZE_CACHE", str(root))
    return root / "baselines"


@pytest.fixture(scope="session")
def tiny_eval(tmp_path_factory) -> dict[str, Path]:
    """Tiny Qwen3-MoE (4 q heads over 2 kv heads, E=8, H=32, I=16, vocab 64, random
    unit-scale weights), its Tucker checkpoints at low ranks (``tucker_refs.PLAN``) and at
    full ranks (8,32,16: exact), and a text of 2,000 characters (tokens) for it."""
    from tuckerize.compress import decompose_checkpoint

    root = tmp_path_factory.mktemp("tiny_eval")
    src = M.build_random("qwen3_moe", root / "qwen3", seed=11)
    low = R.decompose_tiny(src, root / "qwen3-tucker-low")
    full = root / "qwen3-tucker-full"
    decompose_checkpoint(str(src), full, ranks="8,32,16")
    text = root / "text.txt"
    text.write_text(M.text_for_tiny(2000))
    return {"src": src, "low": low, "full": full, "text": text, "root": root}


@pytest.fixture(scope="session")
def demo_tuckers(tmp_path_factory) -> dict[str, Path]:
    """The demo model (E=16, H=128, I=64) decomposed at ranks 8,64,32 (heavier) and
    16,112,56 (lighter)."""
    from tuckerize.compress import decompose_checkpoint
    from tuckerize.demo import DEMO_DIR

    root = tmp_path_factory.mktemp("demo_tucker")
    out = {}
    for name, ranks in (("heavy", "8,64,32"), ("light", "16,112,56")):
        out[name] = root / f"demo-{ranks.replace(',', '-')}"
        decompose_checkpoint(str(DEMO_DIR), out[name], ranks=ranks)
    return out


@pytest.fixture
def cli():
    """``cli(*args) -> click Result``: the tuckerize command run in this process
    (stdout and stderr kept apart)."""
    from typer.testing import CliRunner

    from tuckerize.cli import app

    runner = CliRunner()

    def run(*args: str):
        return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)

    return run


@pytest.fixture(scope="session")
def hf_arch_eval(tmp_path_factory):
    """``get(arch) -> (original, Tucker)`` for the architectures eval runs through
    transformers (DeepSeek-V3, Qwen3-Next): random unit-scale weights, ``tucker_refs.PLAN``."""
    root = tmp_path_factory.mktemp("hf_eval")
    cache: dict[str, tuple[Path, Path]] = {}
    overrides = {"deepseek_v3": dict(num_key_value_heads=4), "qwen3_next": {}}

    def get(arch: str) -> tuple[Path, Path]:
        if arch not in cache:
            src = M.build_random(arch, root / arch, seed=5, **overrides[arch])
            cache[arch] = (src, R.decompose_tiny(src, root / f"{arch}-tucker"))
        return cache[arch]

    return get

"""Shared fixtures: tiny real-architecture checkpoints, built once per session.

Checkpoints built here are shared by many tests: never modify them in place;
copy one into ``tmp_path`` (see :func:`copy_checkpoint`) before damaging it.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Callable

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import tiny_models  # noqa: E402

# Keep the machine's 2 cores for the other engineers and keep tests offline.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.pop("TUCKERIZE_DEBUG", None)


@pytest.fixture(scope="session", autouse=True)
def _torch_threads():
    import torch

    torch.set_num_threads(1)
    yield


@pytest.fixture(scope="session")
def tiny_factory(tmp_path_factory) -> Callable[..., Path]:
    """``tiny_factory(arch, dtype=torch.float32, **overrides)`` -> folder, cached per session."""
    import torch

    cache: dict[tuple, Path] = {}
    root = tmp_path_factory.mktemp("tiny")

    def get(arch: str, dtype: "torch.dtype" = torch.float32, seed: int = 0, **overrides) -> Path:
        key = (arch, str(dtype), seed, tuple(sorted((k, repr(v)) for k, v in overrides.items())))
        if key not in cache:
            folder = root / f"{arch}-{str(dtype).split('.')[-1]}-{len(cache)}"
            cache[key] = tiny_models.build_tiny(arch, folder, dtype=dtype, seed=seed, **overrides)
        return cache[key]

    return get


@pytest.fixture(scope="session", params=tiny_models.MOE_ARCHS)
def moe_arch(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def moe_ckpt(tiny_factory, moe_arch) -> Path:
    """Each supported architecture, float32, written by ``save_pretrained``."""
    return tiny_factory(moe_arch)


@pytest.fixture(scope="session")
def qwen3_ckpt(tiny_factory) -> Path:
    return tiny_factory("qwen3_moe")


@pytest.fixture(scope="session")
def fused_pair(tmp_path_factory) -> tuple[Path, Path]:
    """(fused-layout folder, per-expert folder) holding the same weights.

    moe_intermediate_size=12 keeps 2I (24), H (32) and I distinct so that a
    transposed axis cannot go unnoticed by shape alone.
    """
    root = tmp_path_factory.mktemp("fused")
    fused = tiny_models.build_fused(root / "fused", per_expert_folder=root / "per_expert", seed=3,
                                    moe_intermediate_size=12)
    return fused, root / "per_expert"


def copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.fixture
def copy_ckpt(tmp_path) -> Callable[[Path, str], Path]:
    def copy(src: Path, name: str = "model") -> Path:
        return copy_checkpoint(src, tmp_path / name)

    return copy


@pytest.fixture(scope="session")
def tucker_factory(tiny_factory, tmp_path_factory) -> Callable[..., tuple[Path, Path]]:
    """``tucker_factory(arch, **overrides)`` -> (tiny source folder, its Tucker checkpoint),
    decomposed once per session with the per-projection ranks of ``tucker_refs.PLAN_YAML``
    (below full rank). Shared: never modify the folders in place."""
    import tucker_refs

    cache: dict[tuple, tuple[Path, Path]] = {}
    root = tmp_path_factory.mktemp("tucker")

    def get(arch: str, **overrides) -> tuple[Path, Path]:
        key = (arch, tuple(sorted((k, repr(v)) for k, v in overrides.items())))
        if key not in cache:
            src = tiny_factory(arch, **overrides)
            cache[key] = (src, tucker_refs.decompose_tiny(src, root / f"{arch}-{len(cache)}"))
        return cache[key]

    return get

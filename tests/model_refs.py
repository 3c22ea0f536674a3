"""Whole-model references for the runtime and eval tests.

``build_random(arch, folder)`` writes a tiny checkpoint (``tiny_models``) whose every
weight is random at unit scale: routers with non-zero, well separated logits, norms
away from 1, non-zero q/k/v biases, so that a weight loaded into the wrong place (or
not at all) changes the logits. ``hf_logits`` is transformers' own forward, optionally
with the routed experts replaced by the dense weights rebuilt from a Tucker checkpoint
(``tucker_refs.tucker_dense``): the independent reference for the runtime's logits.

``build_exact_tucker(arch, folder, ranks)`` is ``build_random`` whose routed experts are of
exact Tucker ranks (random orthonormal factors and core): decomposed at those ranks, the
factors reproduce the experts to float32 rounding, so a Tucker checkpoint of it must serve
the same model as the original.

``causal_lm_worker`` runs the native CausalLM in a spawned gloo process
(``dist_helpers.run_workers``) and saves every rank's logits.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

import tiny_models
import tucker_refs as R


@torch.no_grad()
def randomise(model: torch.nn.Module, seed: int) -> None:
    """Unit-scale random weights in place (linear weights ~ N(0, 1/fan_in))."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "linear_attn" in name:  # Qwen3-Next's gated delta-net keeps its own init
            continue
        r = torch.randn(tuple(p.shape), generator=g, dtype=torch.float64)
        if name.endswith("norm.weight"):
            new = 1.0 + 0.3 * r
        elif name.endswith(".bias"):
            new = 0.3 * r
        elif name.endswith("embed_tokens.weight"):
            new = r
        elif name.endswith("mlp.gate.weight"):  # router: unit scale, choices far from ties
            new = r
        elif name.endswith("experts.gate_up_proj"):  # [E, 2I, H]
            new = r / math.sqrt(p.shape[-1])
        elif name.endswith("experts.down_proj"):  # [E, H, I]
            new = r / math.sqrt(p.shape[-1])
        elif p.ndim == 2:
            new = r / math.sqrt(p.shape[1])
        else:
            continue
        p.copy_(new.to(p.dtype))
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            b.copy_(0.3 * torch.randn(tuple(b.shape), generator=g))


def build_random(arch: str, folder: str | Path, seed: int = 0, **overrides: Any) -> Path:
    """A tiny ``arch`` checkpoint with random unit-scale weights, written by ``save_pretrained``
    with the character-level tokenizer of ``tiny_models``."""
    folder = Path(folder)
    model = tiny_models.make_model(arch, seed=seed, **overrides)
    randomise(model, seed)
    model.save_pretrained(folder)
    for name, text in tiny_models.SIDE_FILES.items():
        (folder / name).write_text(text)
    return folder


def build_exact_tucker(arch: str, folder: str | Path, ranks: dict[str, tuple[int, int, int]], seed: int = 0,
                       **overrides: Any) -> Path:
    """``build_random`` with every MoE layer's stacked experts ``W_p = core_p x U_E x U_H x U_I``
    of exactly ``ranks[p]`` (per projection), at the scale of ``randomise`` (entries of
    variance 1/fan_in)."""
    from tuckerize.arch import moe_spec

    folder = Path(folder)
    model = tiny_models.make_model(arch, seed=seed, **overrides)
    randomise(model, seed)
    spec = moe_spec(model.config.to_dict())
    E, H, I = spec.shape
    for layer in spec.moe_layers:
        factors = R.random_factors(E, H, I, ranks, seed=seed * 100 + layer, dtype=torch.float64)
        for p, (rE, rH, rI) in ranks.items():
            fan_in = I if p == "down" else H
            factors[f"{p}.core"] *= math.sqrt(E * H * I / (fan_in * rE * rH * rI))
        R.install_dense(model.model.layers[layer].mlp.experts, R.dense_from_flat(factors))
    model.save_pretrained(folder)
    for name, text in tiny_models.SIDE_FILES.items():
        (folder / name).write_text(text)
    return folder


def moe_layers(src: Path) -> tuple[int, ...]:
    from tuckerize.arch import moe_spec

    return moe_spec(tiny_models.read_config(src)).moe_layers


def load_hf_reference(src: Path, tucker: Path | None = None):
    """transformers' model of ``src``; with ``tucker``, its routed experts hold the dense
    weights rebuilt (float64 einsum) from the Tucker factors."""
    from transformers import AutoModelForCausalLM

    # The plain per-expert loop: the most direct reference (and grouped_mm needs 16-byte strides).
    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32, experts_implementation="eager").eval()
    if tucker is not None:
        for layer in moe_layers(src):
            R.install_dense(model.model.layers[layer].mlp.experts, R.tucker_dense(tucker, layer))
    return model


@torch.no_grad()
def hf_logits(src: Path, ids: torch.Tensor, tucker: Path | None = None) -> torch.Tensor:
    return load_hf_reference(src, tucker)(ids).logits.float()


def text_for_tiny(n_chars: int = 4000) -> str:
    """Held-out demo text restricted to the tiny tokenizer's characters."""
    from tuckerize.demo import heldout_text_path

    allowed = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ .,!?'\n:;-")
    return "".join(c for c in heldout_text_path().read_text()[: 2 * n_chars] if c in allowed)[:n_chars]


def causal_lm_worker(rank: int, world: int, init_method: str, jobs_file: str, out_dir: str) -> None:
    """For each job ``{"name", "folder", "input"}``: build the native CausalLM of ``folder``
    (original: dense experts, sliced at load; Tucker checkpoint or shard set: Tucker
    experts) in this gloo group and save its logits as ``out_dir/<name>-r<rank>.npy``."""
    import numpy as np
    import torch.distributed as dist

    import dist_helpers
    from tuckerize.parallel import ParallelContext
    from tuckerize.runtime.loader import TensorSource
    from tuckerize.runtime.model import CausalLM

    dist_helpers.init_gloo(rank, world, init_method)
    try:
        for job in json.loads(Path(jobs_file).read_text()):
            source = TensorSource.open(job["folder"], ParallelContext.current())
            assert source.parallel.world == world and source.parallel.rank == rank
            model = CausalLM(source, dense_experts=not source.is_tucker, dtype=torch.float32).eval()
            ids = torch.from_numpy(np.load(job["input"]))
            np.save(Path(out_dir) / f"{job['name']}-r{rank}.npy", model(ids).numpy())
        dist.barrier()
    finally:
        dist.destroy_process_group()

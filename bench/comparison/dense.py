"""The dense source checkpoint and the structural baselines written from it.

:class:`Dense` holds the source's tensors and writes a modified copy in the same format
(bench rows are scored by the product's evaluation code like any checkpoint). Pruning drops
experts and router rows; merging writes each cluster's frequency-weighted average under every
member's name (what a router remapped to the merged expert computes); per-expert SVD, plain or
whitened by the routed input covariance (SVD-LLM), writes the low-rank reconstruction. Each
returns the tensors and the bytes the row would store.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch


class Dense:
    """The source checkpoint's tensors, and writing a modified copy in the same format."""

    def __init__(self, folder: Path):
        from safetensors.torch import load_file

        from tuckerize.arch import moe_spec
        from tuckerize.checkpoint import load_config

        self.folder = folder
        self.config = load_config(folder)
        self.spec = moe_spec(self.config)
        self.tensors = load_file(str(folder / "model.safetensors"))
        E, H, I = self.spec.shape
        self.E, self.H, self.I, self.K = E, H, I, self.spec.top_k
        self.layers = list(self.spec.moe_layers)
        self.dense_bytes = 3 * E * H * I * 2 * len(self.layers)
        self.dense_macs = len(self.layers) * self.K * 3 * H * I

    def name(self, layer: int, proj: str, e: int) -> str:
        return self.spec.arch.expert_name(layer, proj, e)

    def write(self, out: Path, tensors: dict, config: dict | None = None) -> Path:
        from safetensors.torch import save_file

        from tuckerize.checkpoint import SIDE_FILES

        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "model.safetensors"),
                  metadata={"format": "pt"})
        (out / "config.json").write_text(json.dumps(config or self.config, indent=2))
        for f in SIDE_FILES:
            if (self.folder / f).is_file():
                shutil.copyfile(self.folder / f, out / f)
        return out


def prune(d: Dense, keep: int, score: dict[int, torch.Tensor]) -> tuple[dict, dict, int]:
    """Keep the ``keep`` experts of each layer with the highest score; router rows dropped."""
    t = {k: v for k, v in d.tensors.items()}
    config = dict(d.config)
    for layer in d.layers:
        kept = sorted(torch.argsort(score[layer], descending=True)[:keep].tolist())
        for p in ("gate", "up", "down"):
            old = {e: t.pop(d.name(layer, p, e)) for e in range(d.E)}
            for new, e in enumerate(kept):
                t[d.name(layer, p, new)] = old[e]
        r = d.spec.arch.router_name(layer)
        t[r] = t[r][kept].contiguous()
    for key in ("num_experts", "num_local_experts"):
        if key in config:
            config[key] = keep
    return t, config, keep * 3 * d.H * d.I * 2 * len(d.layers)


def clusters(feat: torch.Tensor, n: int) -> list[list[int]]:
    """Average-linkage agglomerative clustering of experts by their outputs ``feat [E, T, H]``."""
    f = feat.reshape(feat.shape[0], -1).double()
    dist = torch.cdist(f, f)
    groups = [[e] for e in range(f.shape[0])]
    while len(groups) > n:
        best = None
        for i in range(len(groups)):
            for j in range(i + 1, len(groups)):
                dd = float(dist[groups[i]][:, groups[j]].mean())
                if best is None or dd < best[0]:
                    best = (dd, i, j)
        _, i, j = best
        groups[i] += groups.pop(j)
    return groups


def merge(d: Dense, n: int, stats: dict) -> tuple[dict, int]:
    """Frequency-weighted average of each cluster's experts, written under every member's name."""
    t = dict(d.tensors)
    for layer in d.layers:
        freq = stats[layer]["freq"]
        for group in clusters(stats[layer]["feat"], n):
            w = freq[group] / freq[group].sum().clamp_min(1)
            for p in ("gate", "up", "down"):
                merged = sum(float(w[i]) * d.tensors[d.name(layer, p, e)].float() for i, e in enumerate(group))
                for e in group:
                    t[d.name(layer, p, e)] = merged.to(d.tensors[d.name(layer, p, e)].dtype).clone()
    return t, n * 3 * d.H * d.I * 2 * len(d.layers)


def svd(d: Dense, rank: int, stats: dict | None, ridge: float = 1e-2) -> tuple[dict, int]:
    """Per-expert truncated SVD of each [out, in] matrix; with ``stats``, whitened by the
    Cholesky factor of the expert's routed input covariance (+ ridge x mean eigenvalue)."""
    t = dict(d.tensors)
    for layer in d.layers:
        for p in ("gate", "up", "down"):
            for e in range(d.E):
                n = d.name(layer, p, e)
                w = t[n].double()
                if stats is None:
                    u, s, vh = torch.linalg.svd(w, full_matrices=False)
                    approx = (u[:, :rank] * s[:rank]) @ vh[:rank]
                else:
                    c = stats[layer]["cov_a" if p == "down" else "cov_h"][e]
                    c = c + ridge * max(float(c.diagonal().mean()), 1e-12) * torch.eye(c.shape[0], dtype=c.dtype)
                    chol = torch.linalg.cholesky(c)  # C = L L^T; ||W X^T|| = ||W L||
                    u, s, vh = torch.linalg.svd(w @ chol, full_matrices=False)
                    approx = torch.linalg.solve_triangular(chol.T, ((u[:, :rank] * s[:rank]) @ vh[:rank]).T,
                                                           upper=True).T  # (U S V^T) L^{-1}
                t[n] = approx.to(t[n].dtype).contiguous()
    return t, d.E * 3 * rank * (d.H + d.I) * 2 * len(d.layers)

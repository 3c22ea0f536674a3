"""Scoring every row with the product's evaluation code, and the calibration statistics that
the structural baselines need.

:class:`Scorer`: ``tuckerize.evaluate``'s ``load_model`` / ``score_baseline`` / ``score_tucker``
(native runtime, float32): perplexity, KL(original || row) on the original's top-256 plus a
rest bucket, top-1 agreement with the original, on the selection and report splits of the
model's ``heldout.txt`` (:mod:`protocol`). :func:`collect_stats`: per expert, the routed
pairs, REAP saliency, routed input covariances and outputs on a few calibration tokens.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from comparison.protocol import FEAT_TOKENS, KL_TOPK, SAMPLES, SELECT, SEQLEN


class Scorer:
    """The product's scoring functions on the selection and report splits of heldout.txt."""

    def __init__(self, folder: Path):
        from transformers import AutoTokenizer

        from tuckerize.evaluate.runtimes import load_model
        from tuckerize.evaluate.scoring import score_baseline, token_windows
        from tuckerize.parallel import ParallelContext
        from tuckerize.progress import ensure

        self.folder = folder
        self.parallel, self.device, self.progress = ParallelContext.current(), torch.device("cpu"), ensure(None)
        tok = AutoTokenizer.from_pretrained(str(folder))
        text = (folder / "heldout.txt").read_text()
        ids = torch.tensor(tok(text, add_special_tokens=False, verbose=False)["input_ids"])
        windows = token_windows(ids, SEQLEN, None)
        self.splits = {"select": windows[:SELECT], "report": windows[SELECT:]}
        model = load_model(str(folder), self.parallel, self.device, torch.float32)
        self.base = {k: score_baseline(model, w, KL_TOPK, self.device, self.progress) for k, w in self.splits.items()}

    def baseline(self, split: str) -> dict:
        return {"ppl": math.exp(float(self.base[split]["nll"].mean())), "kl": 0.0, "top1": 1.0}

    def __call__(self, folder: Path, split: str = "report") -> dict:
        return self.splits_of(folder, (split,))[split]

    def splits_of(self, folder: Path, splits=("select", "report")) -> dict[str, dict]:
        """``{split: {ppl, kl, top1}}`` of the checkpoint in ``folder`` (loaded once)."""
        from tuckerize.evaluate.runtimes import load_model
        from tuckerize.evaluate.scoring import score_tucker

        model = load_model(str(folder), self.parallel, self.device, torch.float32)
        out = {}
        for split in splits:
            r = score_tucker(model, self.splits[split], self.base[split], self.device, 0, self.progress)
            out[split] = {"ppl": math.exp(float(r["nll"].mean())), "kl": float(r["kl"].mean()),
                          "top1": float(r["agree"].mean())}
        return out


def _calibration_api():
    """(LayerwiseRunner, calibration_tokens, read_calibration_text) of the calibration package."""
    from tuckerize.calibration.tokens import calibration_tokens
    from tuckerize.runtime.layerwise import LayerwiseRunner
    from tuckerize.text import read_text

    return LayerwiseRunner, calibration_tokens, lambda spec: read_text(spec, "calibration")


class StatsExperts(torch.nn.Module):
    """Dense routed experts that record what the baselines need, per expert: routed pairs,
    the REAP sum of router weight x ||output||, the routed input covariances of gate/up
    (``[H, H]``) and of down (``[I, I]``) in float64, and every expert's output on the first
    ``FEAT_TOKENS`` tokens (for clustering)."""

    def __init__(self, w: dict, act: str):
        super().__init__()
        from tuckerize.parallel import activation

        self.w = {p: t.float() for p, t in w.items()}
        E, H, I = self.w["gate"].shape
        self.num_experts, self.act = E, activation(act)
        self.freq = torch.zeros(E, dtype=torch.float64)
        self.reap = torch.zeros(E, dtype=torch.float64)
        self.cov_h = torch.zeros(E, H, H, dtype=torch.float64)
        self.cov_a = torch.zeros(E, I, I, dtype=torch.float64)
        self.feat: list[torch.Tensor] = []
        self.feat_left = FEAT_TOKENS

    def _expert(self, e: int, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.act(h @ self.w["gate"][e]) * (h @ self.w["up"][e])
        return a, a @ self.w["down"][e].T

    def partial(self, x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        x = x.float()
        out = torch.zeros_like(x)
        if self.feat_left > 0:
            xs = x[: self.feat_left]
            self.feat.append(torch.stack([self._expert(e, xs)[1] for e in range(self.num_experts)]))
            self.feat_left -= xs.shape[0]
        for e in range(self.num_experts):
            t, k = (top_k_index == e).nonzero(as_tuple=True)
            if t.numel() == 0:
                continue
            h, we = x[t], top_k_weights[t, k].float()
            a, y = self._expert(e, h)
            self.freq[e] += t.numel()
            self.reap[e] += float((we * y.norm(dim=-1)).sum())
            self.cov_h[e] += h.double().T @ h.double()
            self.cov_a[e] += a.double().T @ a.double()
            out.index_add_(0, t, y * we[:, None])
        return out

    def finish(self, s: torch.Tensor) -> torch.Tensor:
        return s


def collect_stats(folder: Path, samples: int = SAMPLES, seqlen: int = SEQLEN) -> dict[int, dict]:
    from tuckerize.runtime.loader import TensorSource

    LayerwiseRunner, calibration_tokens, read_calibration_text = _calibration_api()
    source = TensorSource.open(folder)
    text = read_calibration_text("demo")[0]
    tokens = calibration_tokens(text, folder, samples, seqlen)
    runner = LayerwiseRunner(source, tokens, batch_size=16)
    stats = {}
    for layer in range(int(source.config["num_hidden_layers"])):
        if layer in source.spec.moe_layers:
            ex = StatsExperts(runner.stacked_experts(layer), source.config.get("hidden_act", "silu"))
            runner.run(layer, experts=ex)
            stats[layer] = {"freq": ex.freq, "reap": ex.reap / ex.freq.clamp_min(1), "cov_h": ex.cov_h,
                            "cov_a": ex.cov_a, "feat": torch.cat(ex.feat, 1)[:, :FEAT_TOKENS]}
        else:
            runner.run(layer)
    return stats

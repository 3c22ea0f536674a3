"""Scoring: the windows of a text, the original's and the Tucker model's next-token scores, and
the per-layer error of the MoE blocks.

Conventions (DESIGN.md): the text is tokenised whole and cut into non-overlapping windows of
``seqlen`` tokens (the remainder dropped, :func:`token_windows`; the first ones may be skipped,
e.g. the text a setting was chosen on); each window is scored on its
``seqlen - 1`` next-token predictions. :func:`score_baseline` keeps the original's negative
log-likelihoods, top-1 and top-``k`` log-probabilities (what the cache stores);
:func:`score_tucker` scores the Tucker model on the same windows: its negative
log-likelihoods, KL(original || Tucker) per token (:func:`coarse_kl`: the original's top-k
plus one bucket for the rest, exact when k covers the vocabulary, else a lower bound) and
top-1 agreement, capturing the first ``layer_tokens`` inputs of every MoE block on the way;
:func:`layer_errors` feeds those inputs to the original dense block of each layer, one layer
in memory at a time.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from tuckerize.errors import InputError
from tuckerize.evaluate.runtimes import EvalModel
from tuckerize.progress import Progress
from tuckerize.runtime.loader import TensorSource, build_moe_block


def token_windows(ids: torch.Tensor, seqlen: int, max_windows: int | None, skip: int = 0) -> torch.Tensor:
    """Windows ``skip, skip + 1, ...`` (at most ``max_windows``) of the text cut from its
    first token into non-overlapping windows of ``seqlen``: window ``k`` is always tokens
    ``[k * seqlen, (k + 1) * seqlen)``, whatever is skipped, so ``skip=50`` scores exactly
    the windows a run of all windows scores from its 51st on."""
    total = ids.numel() // seqlen
    if total == 0:
        raise InputError(f"the text has {ids.numel()} tokens, fewer than one window of --seqlen {seqlen}; "
                         "use a longer text or a smaller --seqlen")
    if skip >= total:
        raise InputError(f"--skip-windows {skip} leaves no window: the text has {total} windows of --seqlen "
                         f"{seqlen} ({ids.numel():,} tokens); skip fewer, or use a longer text or a smaller --seqlen")
    n = total - skip
    if max_windows:
        n = min(n, max_windows)
    return ids[skip * seqlen: (skip + n) * seqlen].view(n, seqlen)


@torch.no_grad()
def score_baseline(model: EvalModel, windows: torch.Tensor, topk: int, device, progress: Progress) -> dict[str, Any]:
    nll, top1, lp_top, idx_top = [], [], [], []
    progress.start("baseline", len(windows))
    t0 = time.perf_counter()
    for w in windows:
        ids = w[None].to(device)
        logp = torch.log_softmax(model.forward(ids)[0, :-1].float(), -1)
        target = ids[0, 1:]
        nll.append(-logp.gather(-1, target[:, None])[:, 0].cpu())
        top1.append(logp.argmax(-1).cpu())
        v, i = logp.topk(min(topk, logp.shape[-1]), dim=-1)
        lp_top.append(v.cpu())
        idx_top.append(i.to(torch.int32).cpu())
        progress.advance("baseline")
    seconds = time.perf_counter() - t0
    progress.finish("baseline")
    return {"nll": torch.stack(nll), "top1": torch.stack(top1), "lp_top": torch.stack(lp_top),
            "idx_top": torch.stack(idx_top), "seconds": seconds, "vocab": int(logp.shape[-1])}


def coarse_kl(lp_top: torch.Tensor, idx_top: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p || q) over the top-k of p plus one bucket for the rest, per token (float64).
    No bucket when the top-k covers the vocabulary: 1 - sum(p) is then rounding only,
    and a rounding-sized p_rest against q_rest ~ 0 made a spurious term of ~1e-6."""
    lp_top, logq = lp_top.double(), logq.double()
    p = lp_top.exp()
    lq = logq.gather(-1, idx_top.long())
    kl = (p * (lp_top - lq)).sum(-1)
    if lp_top.shape[-1] >= logq.shape[-1]:
        return kl
    p_rest = (1 - p.sum(-1)).clamp_min(0)
    # log of q's mass outside p's top-k, summed in log space (1 - sum(q_top) cancels)
    log_q_rest = logq.scatter(-1, idx_top.long(), float("-inf")).logsumexp(-1)
    tail = torch.where(p_rest > 1e-12, p_rest * (torch.log(p_rest.clamp_min(1e-300)) - log_q_rest),
                       torch.zeros_like(p_rest))
    return kl + tail


@torch.no_grad()
def score_tucker(model: EvalModel, windows: torch.Tensor, base: dict[str, Any], device, layer_tokens: int,
                 progress: Progress) -> dict[str, Any]:
    captured: dict[int, list[torch.Tensor]] = {i: [] for i in model.moe_blocks}
    budget = {"left": layer_tokens}

    def hook(layer):
        def fn(_mod, args):
            if budget["left"] > 0:
                x = args[0].reshape(-1, args[0].shape[-1])
                captured[layer].append(x[: budget["left"]].detach().clone())
        return fn

    handles = [blk.register_forward_pre_hook(hook(i)) for i, blk in model.moe_blocks.items()]
    nll, kl, agree = [], [], []
    progress.start("tucker", len(windows))
    t0 = time.perf_counter()
    for n, w in enumerate(windows):
        ids = w[None].to(device)
        logq = torch.log_softmax(model.forward(ids)[0, :-1].float(), -1).cpu()
        if n == 0 or budget["left"] > 0:
            budget["left"] -= ids.numel()
            if budget["left"] <= 0:
                for h in handles:
                    h.remove()
                handles = []
        target = ids[0, 1:].cpu()
        nll.append(-logq.gather(-1, target[:, None])[:, 0])
        kl.append(coarse_kl(base["lp_top"][n].float(), base["idx_top"][n], logq))
        agree.append((logq.argmax(-1) == base["top1"][n]).float())
        progress.advance("tucker")
    seconds = time.perf_counter() - t0
    for h in handles:
        h.remove()
    progress.finish("tucker")
    inputs = {i: torch.cat(v)[:layer_tokens] for i, v in captured.items() if v}
    return {"nll": torch.stack(nll), "kl": torch.stack(kl), "agree": torch.stack(agree), "seconds": seconds,
            "inputs": inputs}


@torch.no_grad()
def layer_errors(tucker: EvalModel, baseline_path: str, inputs: dict[int, torch.Tensor], parallel, device, dtype,
                 progress: Progress) -> dict[int, float]:
    """Relative error of each MoE block's output against the original dense block, same inputs."""
    source = TensorSource.open(baseline_path, parallel)
    out = {}
    progress.start("layers", len(inputs))
    for layer, x in sorted(inputs.items()):
        dense = build_moe_block(source, layer, dense=True, dtype=dtype, device=device)
        ref = dense(x)
        got = tucker.moe_blocks[layer](x[None])  # transformers' MoE blocks take [batch, seq, hidden]
        if isinstance(got, tuple):
            got = got[0]
        got = got.reshape(ref.shape)
        out[layer] = float((got.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30))
        del dense
        progress.advance("layers", layer=layer)
    progress.finish("layers")
    return out

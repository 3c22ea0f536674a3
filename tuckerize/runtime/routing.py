"""Routers of the supported architectures, identical to transformers' implementations,
registered by kind (:data:`ROUTERS`, keyed by ``Architecture.router_kind``).

``route(hidden, weight, spec, bias) -> (top_k_weights [T, K], top_k_index [T, K])`` computes the
router logits as transformers does (in the hidden states' dtype for the softmax routers, in
float32 for DeepSeek's) and selects from them; ``select_experts(logits, spec, bias)`` is the
selection alone, for a serving engine that computes the logits with its own gate layer
(tuckerize.integrations.vllm.families).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F

from tuckerize.arch import Architecture


@dataclass(frozen=True)
class RouterSpec:
    kind: str
    num_experts: int
    top_k: int
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0
    n_group: int | None = None
    topk_group: int | None = None
    topk_method: str = "greedy"

    @classmethod
    def from_config(cls, arch: Architecture, config: Mapping[str, Any], num_experts: int, top_k: int) -> "RouterSpec":
        return cls(
            kind=arch.router_kind,
            num_experts=num_experts,
            top_k=top_k,
            norm_topk_prob=bool(config.get("norm_topk_prob", False)) or arch.always_norm_topk,
            routed_scaling_factor=float(config.get("routed_scaling_factor") or 1.0),
            n_group=config.get("n_group"),
            topk_group=config.get("topk_group"),
            topk_method=config.get("topk_method") or "greedy",
        )


def _group_mask(scores: torch.Tensor, group_scores: torch.Tensor, spec: RouterSpec) -> torch.Tensor:
    n_group = int(spec.n_group)  # type: ignore[arg-type]
    group_idx = torch.topk(group_scores, k=int(spec.topk_group), dim=-1, sorted=False)[1]  # type: ignore[arg-type]
    group_mask = torch.zeros_like(group_scores)
    group_mask.scatter_(1, group_idx, 1)
    per = spec.num_experts // n_group
    return group_mask.unsqueeze(-1).expand(-1, n_group, per).reshape(-1, spec.num_experts).bool()


def _softmax_topk(logits, spec: RouterSpec, bias):
    probs = torch.softmax(logits, dim=-1, dtype=torch.float)
    top_w, top_i = torch.topk(probs, spec.top_k, dim=-1)
    if spec.norm_topk_prob:
        top_w = top_w / top_w.sum(dim=-1, keepdim=True)
    return top_w.to(logits.dtype), top_i


def _deepseek_v2(logits, spec: RouterSpec, bias):
    scores = logits.float().softmax(dim=-1, dtype=torch.float32)
    if spec.topk_method == "group_limited_greedy":
        n_group = int(spec.n_group)  # type: ignore[arg-type]
        group_scores = scores.view(-1, n_group, spec.num_experts // n_group).max(dim=-1).values
        scores = scores.masked_fill(~_group_mask(scores, group_scores, spec), 0.0)
    top_w, top_i = torch.topk(scores, k=spec.top_k, dim=-1, sorted=False)
    return top_w * spec.routed_scaling_factor, top_i


def _deepseek_v3(logits, spec: RouterSpec, bias):
    scores = logits.float().sigmoid()
    choice = scores + (bias if bias is not None else 0.0)
    n_group = int(spec.n_group or 1)
    group_scores = choice.view(-1, n_group, spec.num_experts // n_group).topk(2, dim=-1)[0].sum(dim=-1)
    choice = choice.masked_fill(~_group_mask(choice, group_scores, spec), float("-inf"))
    top_i = torch.topk(choice, k=spec.top_k, dim=-1, sorted=False)[1]
    top_w = scores.gather(1, top_i)
    if spec.norm_topk_prob:
        top_w = top_w / (top_w.sum(dim=-1, keepdim=True) + 1e-20)
    return top_w * spec.routed_scaling_factor, top_i


@dataclass(frozen=True)
class RouterKind:
    """One router semantics: ``fn(logits, spec, bias) -> (top_k_weights, top_k_index)``;
    ``bias``: whether it reads a per-expert score correction bias (``Architecture.router_bias``);
    ``float32_logits``: whether transformers computes its logits in float32."""

    fn: Callable
    bias: bool = False
    float32_logits: bool = False


#: Routers by ``Architecture.router_kind``.
ROUTERS: dict[str, RouterKind] = {
    "softmax_topk": RouterKind(_softmax_topk),
    "deepseek_v2": RouterKind(_deepseek_v2, float32_logits=True),
    "deepseek_v3": RouterKind(_deepseek_v3, bias=True, float32_logits=True),
}


def route(
    hidden: torch.Tensor, weight: torch.Tensor, spec: RouterSpec, bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k routing weights and expert indices for ``hidden`` [T, H]."""
    if ROUTERS[_kind(spec)].float32_logits:
        return select_experts(F.linear(hidden.float(), weight.float()), spec, bias)
    return select_experts(F.linear(hidden, weight), spec, bias)


def select_experts(
    logits: torch.Tensor, spec: RouterSpec, bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k routing weights and expert indices from router logits [T, E]."""
    return ROUTERS[_kind(spec)].fn(logits, spec, bias)


def _kind(spec: RouterSpec) -> str:
    if spec.kind not in ROUTERS:
        raise ValueError(f"unknown router kind {spec.kind}")
    return spec.kind


def sorted_pairs(top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
    """Routed ``(expert, token, weight)`` pairs, sorted by expert (stable)."""
    T, K = top_k_index.shape
    flat_e = top_k_index.reshape(-1)
    flat_t = torch.arange(T, device=top_k_index.device).repeat_interleave(K)
    flat_w = top_k_weights.reshape(-1)
    order = torch.argsort(flat_e, stable=True)
    return flat_e[order], flat_t[order], flat_w[order]


def expert_groups(pair_e: torch.Tensor, num_experts: int):
    """``(expert, start, stop)`` for each expert with at least one of the sorted pairs
    (one host synchronisation for the whole loop)."""
    start = 0
    for e, n in enumerate(torch.bincount(pair_e, minlength=num_experts).tolist()):
        if n:
            yield e, start, start + n
            start += n

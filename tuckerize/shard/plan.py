"""Which tensor is split along which axis for tensor parallelism: one table for the
shard writer and the runtime loader.

A rule maps a tensor name (and the config) to ``Split(axis, sizes)`` or ``None``
(replicated). Splits are contiguous and follow the semantic axis:

=========================================  =====================  ==========================
tensor                                     split                  why
=========================================  =====================  ==========================
q_proj / k_proj / v_proj weight, bias      axis 0, by heads       column-parallel attention
o_proj weight                              axis 1, by heads       row-parallel, all-reduce
embed_tokens, lm_head                      axis 0, by vocab       vocabulary-parallel
dense / shared-expert gate_proj, up_proj   axis 0, intermediate   column-parallel MLP
dense / shared-expert down_proj            axis 1, intermediate   row-parallel MLP
Tucker U_I (layout intermediate)           axis 0, intermediate   rows I_r of U_I
Tucker U_E (layout expert)                 axis 0, experts        rows E_r of U_E (cores E_r)
norms, routers, shared_expert_gate, rest   replicated
=========================================  =====================  ==========================

Key/value heads fewer than the world size are replicated (each rank keeps the kv
head its query heads use), as in vLLM. Sizes that do not divide are split unevenly
(the first ranks take one more) where that is exact; heads must divide.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping

from tuckerize.errors import ShardError
from tuckerize.runtime.parallel import split_range


@dataclass(frozen=True)
class Split:
    axis: int
    start: int
    stop: int


def attention_dims(config: Mapping[str, Any]) -> tuple[int, int, int]:
    heads = int(config["num_attention_heads"])
    kv = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or config["hidden_size"] // heads)
    return heads, kv, head_dim


def valid_tp(config: Mapping[str, Any], limit: int = 64) -> list[int]:
    heads, kv, _ = attention_dims(config)
    return [t for t in range(1, limit + 1) if heads % t == 0 and (kv % t == 0 or t % kv == 0)]


def check_tp(config: Mapping[str, Any], tp: int) -> None:
    if tp < 1:
        raise ShardError(f"--tp {tp} must be at least 1")
    heads, kv, _ = attention_dims(config)
    if heads % tp or (kv % tp and tp % kv):
        ok = ", ".join(map(str, valid_tp(config, max(tp, heads))))
        raise ShardError(
            f"--tp {tp} does not divide the {heads} attention heads ({kv} key/value heads); use one of: {ok}"
        )


def _heads_split(num_heads: int, head_dim: int, tp: int, rank: int, axis: int, replicate_ok: bool) -> Split:
    if num_heads % tp == 0:
        per = num_heads // tp
        return Split(axis, rank * per * head_dim, (rank + 1) * per * head_dim)
    if replicate_ok and tp % num_heads == 0:  # fewer kv heads than ranks: replicate
        h = rank // (tp // num_heads)
        return Split(axis, h * head_dim, (h + 1) * head_dim)
    raise ShardError(f"{num_heads} heads cannot be split over {tp} ranks")


_ATTN = re.compile(r"\.self_attn\.(q_proj|k_proj|v_proj|o_proj|q_norm|k_norm)\.(weight|bias)$")
_MLP = re.compile(r"\.(mlp|shared_expert|shared_experts|block_sparse_moe)\.(?:shared_experts?\.)?(gate_proj|up_proj|down_proj)\.weight$")
_FACTOR = re.compile(r"\.experts\.(gate|up|down)\.(U_E|U_H|U_I|core)$")


def tensor_split(
    name: str, shape: list[int], config: Mapping[str, Any], tp: int, rank: int, layout: str
) -> Split | None:
    """How ``name`` (full shape ``shape``) is split for ``rank`` of ``tp``; None: replicated."""
    if tp == 1:
        return None
    m = _FACTOR.search(name)
    if m:
        factor = m.group(2)
        if factor == "U_I" and layout == "intermediate":
            return Split(0, *split_range(shape[0], tp, rank))
        if factor == "U_E" and layout == "expert":
            return Split(0, *split_range(shape[0], tp, rank))
        return None
    m = _ATTN.search(name)
    if m and "q_lora" not in name:
        heads, kv, head_dim = attention_dims(config)
        proj = m.group(1)
        if proj == "o_proj":
            return _heads_split(heads, head_dim, tp, rank, axis=1, replicate_ok=False)
        n = heads if proj.startswith("q_") else kv
        rows = shape[0]
        # Per-head norms (Qwen3), gated q_proj (Qwen3-Next), MLA: not a per-head layout; replicated.
        if rows != n * head_dim or (proj.endswith("norm") and n == 1):
            return None
        return _heads_split(n, head_dim, tp, rank, axis=0, replicate_ok=not proj.startswith("q_"))
    if name.endswith(("embed_tokens.weight", "lm_head.weight")):
        return Split(0, *split_range(shape[0], tp, rank))
    m = _MLP.search(name)
    if m and ".experts." not in name:
        if m.group(2) == "down_proj":
            return Split(1, *split_range(shape[1], tp, rank))
        return Split(0, *split_range(shape[0], tp, rank))
    return None


def take(tensor, split: Split | None):
    """The slice of a full tensor that a split names (the tensor itself if replicated)."""
    if split is None:
        return tensor
    return tensor.narrow(split.axis, split.start, split.stop - split.start)

"""A tensor-parallel causal LM for the natively supported MoE architectures.

In the spirit of nano-vllm: column/row-parallel linears, vocabulary-parallel embedding
and LM head, RMSNorm, rotary embeddings, attention through
``scaled_dot_product_attention``, the architecture's router, and the Tucker experts
(or dense experts, for the baseline). Module names equal checkpoint tensor names, and
every parameter is filled by :meth:`TensorSource.load`, which slices full tensors to
this rank's part or takes a shard file's slice as it is.

Architectures: those whose record in :mod:`tuckerize.arch` has an attention style
(Qwen3-MoE, Qwen2-MoE, Mixtral, OLMoE): q/k/v bias, q/k normalisation per head (Qwen3)
or over the whole projection (OLMoE), a sliding window (Mixtral). DeepSeek (MLA) and
Qwen3-Next (gated delta-net) go through :mod:`tuckerize.runtime.hf` instead.

Tensor parallelism lives in the layers: each one that splits its weights says which
slice of each full tensor this rank holds (``shard_spec``) beside its forward.

Collectives per decoder layer: one all-reduce after attention (H values per token) and
one in the MoE block (r_H values per token for Tucker; H for dense experts).
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from tuckerize.arch import ARCHITECTURES, AttentionStyle
from tuckerize.errors import UnsupportedArchitectureError
from tuckerize.parallel import ParallelContext, Split, attention_dims, check_tp, head_range, split_range, split_sizes
from tuckerize.runtime.loader import TensorSource, build_moe_block
from tuckerize.runtime.moe import ParallelMLP


def native_supported(arch_name: str) -> bool:
    """Whether the native runtime covers the architecture named ``arch_name``."""
    return any(a.name == arch_name and a.native for a in ARCHITECTURES)


class RMSNorm(nn.Module):
    """RMSNorm; with ``parallel`` set, the normalised dimension is split over ranks and the
    mean of squares is all-reduced (OLMoE's q/k norm over head-sharded projections)."""

    def __init__(self, dim: int, eps: float, full_dim: int | None = None, parallel: ParallelContext | None = None,
                 dtype=None, device=None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype, device=device), requires_grad=False)
        self.eps = eps
        self.full_dim = full_dim or dim
        self.parallel = parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        sq = h.pow(2).sum(-1, keepdim=True)
        if self.parallel is not None and self.full_dim != h.shape[-1]:
            sq = self.parallel.all_reduce(sq)
        h = h * torch.rsqrt(sq / self.full_dim + self.eps)
        return self.weight * h.to(dtype)


def rope_theta(config: Mapping[str, Any]) -> float:
    params = config.get("rope_parameters") or config.get("rope_scaling") or {}
    kind = params.get("rope_type", params.get("type", "default")) if params else "default"
    if kind not in ("default", None):
        raise UnsupportedArchitectureError(
            f"rope type {kind!r} is not implemented by the native runtime; use --runtime hf"
        )
    return float(params.get("rope_theta") or config.get("rope_theta") or 10000.0)


class Rotary(nn.Module):
    def __init__(self, head_dim: int, theta: float, device=None):
        super().__init__()
        inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
        self.register_buffer("inv_freq", inv, persistent=False)

    def forward(self, positions: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions[..., None].float() * self.inv_freq
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + _rotate_half(x) * sin  # cos, sin: [S, head_dim], broadcast over batch and heads


class Attention(nn.Module):
    def __init__(self, config: Mapping[str, Any], style: AttentionStyle, parallel: ParallelContext, dtype=None, device=None):
        super().__init__()
        heads, kv, head_dim = attention_dims(config)
        hidden = int(config["hidden_size"])
        world = parallel.world
        self.parallel = parallel
        self.head_dim = head_dim
        self.q_heads = head_range(heads, world, parallel.rank)
        self.kv_heads = head_range(kv, world, parallel.rank, replicate=True)  # kv < world: replicated
        self.n_q = self.q_heads[1] - self.q_heads[0]
        self.n_kv = self.kv_heads[1] - self.kv_heads[0]
        kw = {"dtype": dtype, "device": device}
        self.q_proj = nn.Linear(hidden, self.n_q * head_dim, bias=style.qkv_bias, **kw)
        self.k_proj = nn.Linear(hidden, self.n_kv * head_dim, bias=style.qkv_bias, **kw)
        self.v_proj = nn.Linear(hidden, self.n_kv * head_dim, bias=style.qkv_bias, **kw)
        self.o_proj = nn.Linear(self.n_q * head_dim, hidden, bias=False, **kw)
        eps = float(config.get("rms_norm_eps", 1e-6))
        self.qk_norm = style.qk_norm
        if style.qk_norm == "head":
            self.q_norm = RMSNorm(head_dim, eps, **kw)
            self.k_norm = RMSNorm(head_dim, eps, **kw)
        elif style.qk_norm == "full":
            self.q_norm = RMSNorm(self.n_q * head_dim, eps, heads * head_dim, parallel, **kw)
            # The norm spans all kv heads. With fewer kv heads than ranks each head is replicated
            # on world // kv ranks, so the all-reduced sum of squares counts it that many times.
            replicas = 1 if kv % world == 0 else world // kv
            self.k_norm = RMSNorm(self.n_kv * head_dim, eps, kv * head_dim * replicas, parallel, **kw)
        self.clip_qkv = config.get("clip_qkv")
        self.scaling = head_dim**-0.5
        for p in self.parameters():
            p.requires_grad_(False)

    def shard_spec(self, name: str) -> Split | None:
        """q (and a "full" q norm) rows by query heads, k/v (and a "full" k norm) rows by
        key/value heads, o_proj columns by query heads; per-head norms replicated."""
        if self.parallel.world == 1:
            return None
        module, _, _ = name.partition(".")
        hd = self.head_dim
        q = (self.q_heads[0] * hd, self.q_heads[1] * hd)
        kv = (self.kv_heads[0] * hd, self.kv_heads[1] * hd)
        if module == "o_proj":
            return Split(1, *q)
        if module == "q_proj" or (module == "q_norm" and self.qk_norm == "full"):
            return Split(0, *q)
        if module in ("k_proj", "v_proj") or (module == "k_norm" and self.qk_norm == "full"):
            return Split(0, *kv)
        return None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, S, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip_qkv is not None:
            q, k, v = (t.clamp(-self.clip_qkv, self.clip_qkv) for t in (q, k, v))
        q = q.view(B, S, self.n_q, self.head_dim)
        k = k.view(B, S, self.n_kv, self.head_dim)
        v = v.view(B, S, self.n_kv, self.head_dim)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if self.n_kv != self.n_q:
            rep = self.n_q // self.n_kv
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scaling)
        out = out.transpose(1, 2).reshape(B, S, self.n_q * self.head_dim)
        return self.parallel.all_reduce(self.o_proj(out))


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab: int, hidden: int, parallel: ParallelContext, dtype=None, device=None):
        super().__init__()
        self.parallel = parallel
        self.start, self.stop = split_range(vocab, parallel.world, parallel.rank)
        self.weight = nn.Parameter(torch.zeros(self.stop - self.start, hidden, dtype=dtype, device=device),
                                   requires_grad=False)

    def shard_spec(self, name: str) -> Split | None:
        """Rows (vocabulary entries) ``[start, stop)``."""
        return Split(0, self.start, self.stop) if self.parallel.world > 1 else None

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.parallel.world == 1:
            return F.embedding(ids, self.weight)
        mask = (ids >= self.start) & (ids < self.stop)
        out = F.embedding((ids - self.start) * mask, self.weight) * mask[..., None].to(self.weight.dtype)
        return self.parallel.all_reduce(out)


class ParallelLMHead(nn.Module):
    def __init__(self, vocab: int, hidden: int, parallel: ParallelContext, dtype=None, device=None):
        super().__init__()
        self.parallel = parallel
        self.sizes = split_sizes(vocab, parallel.world)
        self.start, self.stop = split_range(vocab, parallel.world, parallel.rank)
        self.weight = nn.Parameter(torch.zeros(self.stop - self.start, hidden, dtype=dtype, device=device),
                                   requires_grad=False)

    def shard_spec(self, name: str) -> Split | None:
        """Rows (vocabulary entries) ``[start, stop)``; the logits are all-gathered."""
        return Split(0, self.start, self.stop) if self.parallel.world > 1 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.parallel.all_gather_cat(F.linear(x, self.weight), self.sizes, dim=-1)


class DecoderLayer(nn.Module):
    def __init__(self, config, style, parallel, mlp: nn.Module, dtype=None, device=None):
        super().__init__()
        eps = float(config.get("rms_norm_eps", 1e-6))
        hidden = int(config["hidden_size"])
        self.input_layernorm = RMSNorm(hidden, eps, dtype=dtype, device=device)
        self.self_attn = Attention(config, style, parallel, dtype, device)
        self.post_attention_layernorm = RMSNorm(hidden, eps, dtype=dtype, device=device)
        self.mlp = mlp

    def forward(self, x, cos, sin):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


def build_decoder_layer(source: TensorSource, i: int, dense_experts: bool = False, mlp: nn.Module | None = None,
                        dtype=None, device=None) -> DecoderLayer:
    """Decoder layer ``i`` built and loaded from ``source`` on its own (the calibration pass
    runs one layer at a time). ``mlp`` replaces the layer's MoE block or MLP (already loaded)."""
    config, spec = source.config, source.spec
    style = spec.arch.attention
    parallel = source.parallel
    own_mlp = mlp is None
    if mlp is None:
        if i in spec.moe_layers:
            mlp = build_moe_block(source, i, dense=dense_experts, dtype=dtype, device=device)
        else:
            hidden, inter = int(config["hidden_size"]), int(config.get("intermediate_size"))
            mlp = ParallelMLP(hidden, inter, parallel, config.get("hidden_act", "silu"), dtype, device)
    layer = DecoderLayer(config, style, parallel, mlp, dtype, device)
    for name, _ in layer.named_parameters():
        if name.startswith("mlp.") and (i in spec.moe_layers or not own_mlp):
            continue  # the MoE block loaded itself (build_moe_block)
        source.load_into(layer, name, spec.arch.layer_name(i, name))
    return layer


class CausalLM(nn.Module):
    """Logits for token ids [B, S] (full vocabulary on every rank)."""

    def __init__(self, source: TensorSource, dense_experts: bool = False, dtype=None, device=None):
        super().__init__()
        config = source.config
        spec = source.spec
        arch = spec.arch
        if not arch.native:
            raise UnsupportedArchitectureError(
                f"the native runtime does not cover {arch.classes[0]} yet; use --runtime hf (single process)"
            )
        parallel = source.parallel
        check_tp(config, parallel.world)
        if config.get("sliding_window") and config.get("use_sliding_window", True) and arch.attention.sliding_window:
            self.sliding_window = int(config["sliding_window"])
        else:
            self.sliding_window = None
        self.config = config
        self.parallel = parallel
        hidden, vocab = int(config["hidden_size"]), int(config["vocab_size"])
        _, _, head_dim = attention_dims(config)
        self.embed_tokens = VocabParallelEmbedding(vocab, hidden, parallel, dtype, device)
        self.layers = nn.ModuleList(
            build_decoder_layer(source, i, dense_experts=dense_experts, dtype=dtype, device=device)
            for i in range(spec.num_layers)
        )
        self.norm = RMSNorm(hidden, float(config.get("rms_norm_eps", 1e-6)), dtype=dtype, device=device)
        self.lm_head = ParallelLMHead(vocab, hidden, parallel, dtype, device)
        self.rotary = Rotary(head_dim, rope_theta(config), device=device)
        self._load(source, arch)

    def _load(self, source: TensorSource, arch) -> None:
        source.load_into(self, "embed_tokens.weight", arch.embed_name)
        tied = not source.has(arch.lm_head_name)  # tie_word_embeddings
        source.load_into(self, "lm_head.weight", arch.embed_name if tied else arch.lm_head_name)
        source.load_into(self, "norm.weight", arch.final_norm_name)
        # decoder layers loaded themselves (build_decoder_layer)

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        B, S = input_ids.shape
        if self.sliding_window is not None and S > self.sliding_window:
            raise UnsupportedArchitectureError(
                f"sequence length {S} exceeds the sliding window {self.sliding_window}; use --seqlen {self.sliding_window}"
            )
        x = self.embed_tokens(input_ids)
        positions = torch.arange(S, device=input_ids.device)
        cos, sin = self.rotary(positions, x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.lm_head(self.norm(x))

    def moe_blocks(self) -> dict[int, nn.Module]:
        spec_layers = [i for i, l in enumerate(self.layers) if hasattr(l.mlp, "experts")]
        return {i: self.layers[i].mlp for i in spec_layers}


__all__ = ["CausalLM", "build_decoder_layer", "native_supported", "AttentionStyle", "RMSNorm", "Rotary", "rope_theta"]

"""Running calibration tokens through a checkpoint one decoder layer at a time.

Calibration tokens ``[N, L]`` are embedded once; their hidden states ``[N, L, H]``
(float32) are the only activations kept. Then for each decoder layer: that layer alone is
loaded (attention, norms, router, experts in their stored dtype), run over the kept hidden
states in micro-batches, its MoE block's inputs go to whoever asked (statistics, hooks),
its output replaces the kept hidden states, and the layer is dropped. Peak memory is one
layer plus the kept activations (plus the token embedding while embedding).

Layers run in the native runtime where it covers the architecture, else as transformers'
own decoder layer (DeepSeek's MLA, Qwen3-Next's gated delta-net), built on the meta device
and materialised one at a time with our routed experts in place of transformers'
(:class:`_HFLayers`). The routed experts are :class:`CollectingExperts`: dense, one expert
at a time, reporting each expert's inputs to an optional statistics sink (duck-typed:
``add_tokens``/``add_expert`` of :class:`tuckerize.calibration.stats.LayerStats`).

Used by calibration (:mod:`tuckerize.calibration.collect`), ``method.sequential`` and ``method.refit``.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from tuckerize.arch import PROJECTIONS
from tuckerize.errors import CalibrationError
from tuckerize.parallel import activation, attention_dims
from tuckerize.runtime.routing import expert_groups, sorted_pairs


def activation_and_slope(act: Callable[[torch.Tensor], torch.Tensor], g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``act(g)`` and its elementwise derivative ``act'(g)`` (autograd: any activation)."""
    with torch.enable_grad():
        gg = g.detach().requires_grad_(True)
        y = act(gg)
        (slope,) = torch.autograd.grad(y.sum(), gg)
    return y.detach(), slope


class CollectingExperts(nn.Module):
    """Dense routed experts (weights in their stored dtype, computed in float32 one expert
    at a time) that report their inputs to ``stats`` (e.g. a
    :class:`~tuckerize.calibration.stats.LayerStats`; None: plain dense experts) as a side
    effect of the forward.

    Plugs into :class:`tuckerize.runtime.moe.MoEBlock` as its experts module."""

    def __init__(self, stacked: Mapping[str, torch.Tensor], act: str, stats: Any = None):
        super().__init__()
        self.w = dict(stacked)  # semantic [E, H, I] per projection, any float dtype
        self.num_experts = self.w["gate"].shape[0]
        self.act_fn = activation(act)
        self.stats = stats

    def partial(self, x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        x = x.float()
        out = torch.zeros_like(x)
        w = top_k_weights.float()
        if self.stats is not None:
            self.stats.add_tokens(x, w.pow(2).sum(-1))
        pair_e, pair_t, pair_w = sorted_pairs(top_k_index, w)
        for e, a0, a1 in expert_groups(pair_e, self.num_experts):
            t = pair_t[a0:a1]
            we = pair_w[a0:a1]
            h = x[t]
            g, u = h @ self.w["gate"][e].float(), h @ self.w["up"][e].float()
            if self.stats is not None:
                s, ds = activation_and_slope(self.act_fn, g)
                a = s * u
                self.stats.add_expert(e, h, a, we, s, u * ds)
            else:
                a = self.act_fn(g) * u
            out.index_add_(0, t, (a @ self.w["down"][e].float().T) * we[:, None])
        return out

    def finish(self, s: torch.Tensor) -> torch.Tensor:
        return s


class LayerwiseRunner:
    """Runs calibration tokens through a checkpoint one decoder layer at a time.

    ``hidden`` [N, S, H] float32 holds the kept activations: the input of the next layer.
    :meth:`run` builds one layer from the source, runs it over ``hidden`` in micro-batches
    (optionally collecting statistics, or with replacement routed experts, e.g. the Tucker
    experts of a sequential calibration), updates ``hidden`` in place and drops the layer.
    """

    def __init__(self, source, tokens: torch.Tensor, batch_size: int = 8, device=None):
        """``source``: a :class:`~tuckerize.runtime.loader.TensorSource` of whole tensors
        (``parallel=ParallelContext()``); ``tokens`` [N, S]; ``device``: where layers run."""
        from tuckerize.runtime.model import Rotary, native_supported, rope_theta

        if source.parallel.world != 1:
            raise ValueError("LayerwiseRunner runs whole layers: open the source with ParallelContext() "
                             f"(got a tensor-parallel source of world size {source.parallel.world})")
        self.source = source
        spec = source.spec
        #: Architectures without a native runtime (DeepSeek's MLA, Qwen3-Next's gated
        #: delta-net layers) run transformers' own decoder layer, one at a time.
        self.hf = None if native_supported(spec.arch.name) else _HFLayers(source)
        config = source.config
        window = config.get("sliding_window")
        sliding = spec.arch.attention is not None and spec.arch.attention.sliding_window
        if window and config.get("use_sliding_window", True) and sliding and tokens.shape[1] > window:
            raise CalibrationError(f"--seqlen {tokens.shape[1]} exceeds the sliding window {window}; use --seqlen {window}")
        self.spec = spec
        self.batch_size = max(1, int(batch_size))
        self.position = 0
        emb = source.get(spec.arch.embed_name)
        vocab = emb.shape[0]
        if int(tokens.max()) >= vocab:
            raise CalibrationError(f"calibration token id {int(tokens.max())} is outside the vocabulary ({vocab}); "
                                   "is the tokenizer the model's?")
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.hidden = F.embedding(tokens, emb).to(self.device, torch.float32)
        del emb
        if self.hf is None:
            _, _, head_dim = attention_dims(config)
            rot = Rotary(head_dim, rope_theta(config), device=self.device)
            self.cos, self.sin = rot(torch.arange(tokens.shape[1], device=self.device), torch.float32)
        else:
            self.hf.prepare(tokens.shape[1], self.device)

    def stacked_experts(self, layer: int) -> dict[str, torch.Tensor]:
        """The layer's routed experts as semantic [E, H, I] tensors in their stored dtype."""
        from tuckerize.experts import expert_tensor_names, stack_projection

        names = expert_tensor_names(self.source.tensors, self.spec, layer)
        stored = self.source.tensors.get(names[0]).dtype
        dtype = stored if stored in (torch.float32, torch.bfloat16, torch.float16) else torch.float32
        return {p: stack_projection(self.source.tensors, self.spec, layer, p, dtype=dtype).to(self.device)
                for p in PROJECTIONS}

    @torch.no_grad()
    def run(self, layer: int, *, stats: Any = None, experts: nn.Module | None = None,
            update: bool = True, on_block_input: Callable[[int, torch.Tensor], None] | None = None) -> None:
        from tuckerize.runtime.loader import build_moe_block
        from tuckerize.runtime.model import build_decoder_layer

        if layer != self.position:
            raise RuntimeError(f"layer {layer} run out of order (next is {self.position})")
        is_moe = layer in self.spec.moe_layers
        if is_moe and experts is None:
            experts = CollectingExperts(self.stacked_experts(layer), self.source.config.get("hidden_act", "silu"), stats)
        if self.hf is not None:
            block = self.hf.layer(layer, experts, self.device)
            if on_block_input is not None and is_moe:
                block.mlp.register_forward_pre_hook(lambda module, args: on_block_input(layer, args[0]))
            forward = self.hf.forward
        else:
            mlp = build_moe_block(self.source, layer, experts=experts, dtype=torch.float32,
                                  device=self.device) if is_moe else None
            block = build_decoder_layer(self.source, layer, mlp=mlp, dtype=torch.float32, device=self.device)
            del mlp
            forward = functools.partial(self._native_forward, layer=layer,
                                        on_block_input=on_block_input if is_moe else None)
        for b0 in range(0, self.hidden.shape[0], self.batch_size):
            out = forward(block, self.hidden[b0 : b0 + self.batch_size])
            if update:
                self.hidden[b0 : b0 + self.batch_size] = out
        del block, experts
        if update:
            self.position += 1

    def _native_forward(self, block: nn.Module, x: torch.Tensor, layer: int,
                        on_block_input: Callable[[int, torch.Tensor], None] | None) -> torch.Tensor:
        h = x + block.self_attn(block.input_layernorm(x), self.cos, self.sin)
        m = block.post_attention_layernorm(h)
        if on_block_input is not None:
            on_block_input(layer, m)
        return h + block.mlp(m)


class _ExpertsAdapter(nn.Module):
    """transformers' MoE blocks call ``experts(x, top_k_index, top_k_weights)``; ours
    split that into ``partial`` and ``finish`` (single process here)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        return self.inner.finish(self.inner.partial(x, top_k_index, top_k_weights)).to(x.dtype)


class _HFLayers:
    """transformers' decoder layers of a checkpoint, built one at a time: the skeleton on
    the meta device (no memory), the layer's routed experts replaced by ours before any
    weight is allocated, then only that layer's tensors materialised from the checkpoint
    (under transformers' own parameter names, which are the checkpoint's)."""

    def __init__(self, source):
        try:
            from transformers import AutoConfig, AutoModelForCausalLM

            config = AutoConfig.from_pretrained(str(source.folder))
            with torch.device("meta"):
                self.model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa",
                                                              dtype=torch.float32)
        except Exception as exc:  # noqa: BLE001
            raise CalibrationError(f"transformers cannot build {source.spec.arch.classes[0]} for calibration "
                                   f"({type(exc).__name__}: {exc}); update transformers or decompose without "
                                   "--calibration") from None
        self.config = config
        self.source = source

    def prepare(self, seqlen: int, device) -> None:
        rotary = type(self.model.model.rotary_emb)(config=self.config).to(device)
        pos = torch.arange(seqlen, device=device)[None]
        probe = torch.zeros(1, seqlen, 1, device=device, dtype=torch.float32)
        self.position_ids = pos
        self.position_embeddings = rotary(probe, pos)

    def layer(self, i: int, experts: nn.Module | None, device) -> nn.Module:
        import copy

        block = copy.deepcopy(self.model.model.layers[i])  # meta: copies no data
        if experts is not None:
            block.mlp.experts = _ExpertsAdapter(experts)
        block.to_empty(device=device)
        for name, t in [*block.named_parameters(), *block.named_buffers()]:
            if experts is not None and name.startswith("mlp.experts."):
                continue
            key = self.source.spec.arch.layer_name(i, name)
            if key not in self.source.tensors.keys():
                raise CalibrationError(f"{key} is not in the checkpoint; transformers names this model's tensors "
                                       "differently from its files, calibration cannot load the layer")
            with torch.no_grad():
                t.copy_(self.source.get(key).to(device, torch.float32))
        return block.eval()

    def forward(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        # No mask: full windows without padding, and transformers' sdpa attention is causal
        # exactly when it is given none (as its own models call it; DeepSeek's MLA breaks
        # with an explicit mask); linear-attention layers take a padding mask only.
        n = x.shape[0]
        cos, sin = self.position_embeddings
        out = block(x, position_embeddings=(cos.expand(n, *cos.shape[1:]), sin.expand(n, *sin.shape[1:])),
                    attention_mask=None, position_ids=self.position_ids.expand(n, -1))
        return out[0] if isinstance(out, tuple) else out


__all__ = ["CollectingExperts", "LayerwiseRunner", "activation_and_slope"]

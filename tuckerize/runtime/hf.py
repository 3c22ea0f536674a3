"""The transformers path: a transformers model whose experts modules are Tucker experts.

For architectures the native runtime does not cover (DeepSeek's MLA attention,
Qwen3-Next's gated delta-net layers), and for lm-eval-harness, which wraps a built
transformers model. Single process.

For a Tucker checkpoint the model is built on the meta device (no memory), each MoE
block's ``experts`` becomes a :class:`TuckerExperts` loaded from the factors, and only
then are the other tensors read from the checkpoint and assigned (transformers' own
parameter names are the checkpoint's); the dense expert set is never allocated.
Non-persistent buffers (rotary frequencies) are rebuilt by their own module from the
config. Routing and shared experts stay transformers' own. An original checkpoint is
loaded with ``from_pretrained``.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from tuckerize.errors import UnsupportedArchitectureError


@contextlib.contextmanager
def quiet_transformers():
    """Silence transformers' load report."""
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)


@torch.no_grad()
def _load_fp8(model, source) -> None:
    """Overwrite what transformers read (an original FP8 checkpoint) from FP8 tensors without
    their scales: every FP8 weight with its dequantisation, and the fused routed experts
    (``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``) from the stacked projections."""
    from tuckerize.experts import stack_projection
    from tuckerize.fp8 import is_fp8

    params = dict(model.named_parameters())
    for name in source.tensors.keys():
        if name in params and is_fp8(source.tensors.dtype(name)):
            params[name].copy_(source.get(name))
    spec = source.spec
    for layer in spec.moe_layers:
        experts = model.get_submodule(spec.arch.experts_prefix(layer))
        w = {p: stack_projection(source.tensors, spec, layer, p) for p in ("gate", "up", "down")}
        experts.gate_up_proj.copy_(torch.cat([w["gate"].transpose(1, 2), w["up"].transpose(1, 2)], dim=1))
        experts.down_proj.copy_(w["down"])


def load_hf_model(folder: str | Path, dtype=torch.float32, device="cpu"):
    """A transformers model for ``folder``: the original model, or a Tucker checkpoint
    with its experts replaced by Tucker experts."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from tuckerize.arch import original_config
    from tuckerize.checkpoint import load_config
    from tuckerize.runtime.loader import TensorSource, build_experts

    folder = Path(folder)
    # A Tucker checkpoint's config.json names Tucker classes that transformers refuses
    # (tuckerize.format.tucker_config); the original architecture is built here.
    cfg = original_config(load_config(folder))
    source = TensorSource.open(folder)
    with quiet_transformers():
        config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    fp8 = source.tensors.fp8 is not None
    if fp8:  # dequantised by tuckerize: transformers' FP8 loader needs accelerate and a GPU
        del config.quantization_config
    if not source.is_tucker:
        with quiet_transformers():
            model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, config=config)
        if fp8:
            _load_fp8(model, source)
        return model.to(device).eval()

    spec = source.spec
    with quiet_transformers():
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    for layer in spec.moe_layers:
        block = model.get_submodule(spec.arch.experts_prefix(layer).rpartition(".")[0])
        block.experts = build_experts(source, layer, dtype=dtype, device=device)
    names = set(source.tensors.keys())
    state = {}
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.device.type != "meta" or name in state:
            continue
        if name in names:
            state[name] = source.get(name).to(device=device, dtype=t.dtype if t.is_floating_point() else None)
    model.load_state_dict(state, strict=False, assign=True)
    if getattr(config, "tie_word_embeddings", False) and spec.arch.lm_head_name not in names:
        model.tie_weights()
    _rebuild_buffers(model, config, device)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    if left:
        raise UnsupportedArchitectureError(
            f"{left[0]} is neither in the Tucker checkpoint nor rebuilt from the config; "
            "transformers names this model's tensors differently from its files"
        )
    return model.eval()


def _rebuild_buffers(model, config, device) -> None:
    """Modules holding computed (non-persistent) buffers, still on meta: built again
    from their config on ``device`` (rotary embeddings)."""
    for name, module in list(model.named_modules()):
        if not any(b.device.type == "meta" for b in module.buffers(recurse=False)):
            continue
        own = getattr(module, "config", None) or config
        with torch.device(device):
            fresh = type(module)(config=own)
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, fresh)

"""The transformers path: a transformers model whose experts modules are Tucker experts.

For architectures the native runtime does not cover (DeepSeek's MLA attention,
Qwen3-Next's gated delta-net layers), and for lm-eval-harness, which wraps a built
transformers model. Single process. The model is loaded from the Tucker checkpoint
with ``from_pretrained`` (transformers maps the non-expert tensor names itself; the
dense experts it cannot find are left as they are initialised and then replaced), and
each MoE block's ``experts`` becomes a :class:`TuckerExperts` loaded from the factors.
Routing and shared experts stay transformers' own.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from tuckerize.format import TuckerCheckpoint


@contextlib.contextmanager
def quiet_transformers():
    """Silence transformers' load report (it lists every replaced expert weight as missing)."""
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)


@torch.no_grad()
def _load_fp8(model, source) -> None:
    """Overwrite what transformers read from FP8 tensors without their scales: every FP8
    weight with its dequantisation and, in an original checkpoint, the fused routed experts
    (``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``) from the stacked projections."""
    from tuckerize.experts import stack_projection
    from tuckerize.fp8 import is_fp8

    params = dict(model.named_parameters())
    for name in source.tensors.keys():
        if name in params and is_fp8(source.tensors.dtype(name)):
            params[name].copy_(source.get(name))
    if source.is_tucker:
        return
    spec = source.spec
    for layer in spec.moe_layers:
        experts = model.model.layers[layer].mlp.experts
        w = {p: stack_projection(source.tensors, spec, layer, p) for p in ("gate", "up", "down")}
        experts.gate_up_proj.copy_(torch.cat([w["gate"].transpose(1, 2), w["up"].transpose(1, 2)], dim=1))
        experts.down_proj.copy_(w["down"])


def load_hf_model(folder: str | Path, dtype=torch.float32, device="cpu"):
    """A transformers model for ``folder``: the original model, or a Tucker checkpoint
    with its experts replaced by Tucker experts."""
    from transformers import AutoModelForCausalLM

    from tuckerize.runtime.loader import TensorSource, build_experts

    folder = Path(folder)
    source = TensorSource.open(folder)
    kwargs = {}
    if source.tensors.fp8 is not None:  # dequantised here: transformers' FP8 loader needs accelerate and a GPU
        from transformers import AutoConfig

        kwargs["config"] = AutoConfig.from_pretrained(str(folder))
        del kwargs["config"].quantization_config
    with quiet_transformers():
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, **kwargs)
    if source.tensors.fp8 is not None:
        _load_fp8(model, source)
    if source.is_tucker:
        tk = TuckerCheckpoint.open(folder)
        for layer in tk.spec.moe_layers:
            block = model.model.layers[layer].mlp
            block.experts = build_experts(source, layer, dtype=dtype)
    return model.to(device).eval()

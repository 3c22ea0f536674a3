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
    with quiet_transformers():
        config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
        model = AutoModelForCausalLM.from_pretrained(str(folder), config=config, dtype=dtype)
    source = TensorSource.open(folder)
    if source.is_tucker:
        tk = TuckerCheckpoint.open(folder)
        for layer in tk.spec.moe_layers:
            block = model.model.layers[layer].mlp
            block.experts = build_experts(source, layer, dtype=dtype)
    return model.to(device).eval()

"""The runtime: Tucker experts (``tucker_experts``), MoE blocks (``moe``), routers
(``routing``), the native tensor-parallel model (``model``), loading (``loader``), the
layout choice and expert assignment from shapes (``layout``), the per-rank split plan asked
of the layers (``plan``), the transformers path (``hf``), the one-layer-at-a-time runner of
calibration (``layerwise``) and the decode kernels (``kernels``).

``from tuckerize.runtime import TuckerExperts`` works; torch is imported on first use.
"""

from __future__ import annotations

from typing import Any

__all__ = ["TuckerExperts", "TensorSource", "CausalLM", "load_hf_model"]

_WHERE = {
    "TuckerExperts": "tuckerize.runtime.tucker_experts",
    "TensorSource": "tuckerize.runtime.loader",
    "CausalLM": "tuckerize.runtime.model",
    "load_hf_model": "tuckerize.runtime.hf",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'tuckerize.runtime' has no attribute {name!r}")

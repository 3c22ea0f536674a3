"""Tucker model classes for vLLM: vLLM's own model, only its MoE blocks replaced.

For each supported architecture, ``Tuckerize<Original>ForCausalLM`` subclasses vLLM's
``<Original>ForCausalLM`` and, while the parent's ``__init__`` builds the model, has the
decoder layers construct :class:`~tuckerize.integrations.vllm.moe.TuckerMoE` instead of
vLLM's fused-MoE block (the block's name in the vLLM module is rebound for the duration of
the construction only). So vLLM's FusedMoE, which allocates the dense [E, 2I, H] / [E, H, I]
expert weights, is never built. Attention, KV cache, scheduling, sampling and the server
are vLLM's. Weights load through vLLM's own loader; the factor tensors reach
``TuckerExperts.load_weights``.

Architectures whose vLLM model has something our block does not yet cover (shared experts:
Qwen2-MoE, Qwen3-Next; DeepSeek's MLA and grouped routing) are registered too, with a
constructor that raises a one-line error naming what is supported.
"""

from __future__ import annotations

import contextlib
import importlib
from typing import Any

from tuckerize.arch import ARCHITECTURES, TUCKER_CLASS_PREFIX, TUCKER_TYPE_PREFIX
from tuckerize.errors import UnsupportedArchitectureError
from tuckerize.integrations.vllm.checks import check_loading, not_yet_message, refuse, unavailable_message

#: arch.name -> (vLLM module, model class, MoE block class replaced by TuckerMoE)
SUPPORTED = {
    "qwen3_moe": ("vllm.model_executor.models.qwen3_moe", "Qwen3MoeForCausalLM", "Qwen3MoeSparseMoeBlock"),
    "mixtral": ("vllm.model_executor.models.mixtral", "MixtralForCausalLM", "MixtralMoE"),
    "olmoe": ("vllm.model_executor.models.olmoe", "OlmoeForCausalLM", "OlmoeMoE"),
}
#: Registered so that loading fails with a clear message (vLLM implements them; the plugin not yet).
NOT_YET = {
    "qwen2_moe": ("vllm.model_executor.models.qwen2_moe", "Qwen2MoeForCausalLM"),
    "qwen3_next": ("vllm.model_executor.models.qwen3_next", "Qwen3NextForCausalLM"),
    "deepseek_v2": ("vllm.model_executor.models.deepseek_v2", "DeepseekV2ForCausalLM"),
    "deepseek_v3": ("vllm.model_executor.models.deepseek_v2", "DeepseekV3ForCausalLM"),
}


def supported_list() -> str:
    return ", ".join(SUPPORTED[name][1] for name in SUPPORTED)


@contextlib.contextmanager
def _rebound(module: Any, name: str, value: Any):
    old = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, old)


def experts_summary(model: Any, factor_storage: Any = None) -> str:
    """One line: the layout, why, and the bytes the Tucker experts hold on this rank per MoE
    layer (factors as loaded, per-expert cores formed from them), with how the checkpoint
    stores the factors."""
    from tuckerize.integrations.vllm.moe import TuckerMoE

    from tuckerize.runtime.tucker_experts import memory_per_layer

    blocks = [m for m in model.modules() if isinstance(m, TuckerMoE)]
    mem = memory_per_layer([b.experts for b in blocks])
    if mem is None:
        return "no Tucker MoE blocks"
    stored = "float32"
    if factor_storage:
        stored = ", ".join(f"{k} {v}" for k, v in factor_storage.get("dtypes", {}).items())
        stored += " (dequantised at load)"
    mib = {k: v / 2**20 for k, v in mem.items()}
    return (f"tuckerize: {blocks[0].plan.describe(blocks[0].tp_size)}; {mem['layers']:.0f} MoE layers hold "
            f"{mib['total']:.2f} MiB each on this rank (factors {mib['factors']:.2f} MiB, per-expert cores "
            f"{mib['cores']:.2f} MiB; dense experts {mib['dense_same_dtype']:.2f} MiB); factors stored as {stored}")


def _log_experts(model: Any, vllm_config: Any) -> None:
    from vllm.logger import init_logger

    storage = vllm_config.model_config.hf_config.to_dict().get("tucker", {}).get("factor_storage")
    init_logger("vllm.tuckerize").info(experts_summary(model, storage))


def tucker_model_class(arch_name: str):
    """``Tuckerize<Original>ForCausalLM`` for ``arch_name``."""
    from tuckerize.integrations.vllm.moe import TuckerMoE, register_op

    module_name, cls_name, block_name = SUPPORTED[arch_name]
    module = importlib.import_module(module_name)
    base = getattr(module, cls_name)

    def __init__(self, *, vllm_config, prefix: str = ""):
        check_loading(vllm_config, SUPPORTED, NOT_YET)  # tucker section, architecture, files: one line
        register_op()
        with _rebound(module, block_name, TuckerMoE):
            base.__init__(self, vllm_config=vllm_config, prefix=prefix)
        _log_experts(self, vllm_config)

    doc = f"vLLM's {cls_name} with Tucker experts (tuckerize.integrations.vllm.moe.TuckerMoE)."
    return _publish(type(TUCKER_CLASS_PREFIX + cls_name, (base,), {"__init__": __init__, "__doc__": doc}))


def unsupported_model_class(arch_name: str):
    module_name, cls_name = NOT_YET[arch_name]
    base = getattr(importlib.import_module(module_name), cls_name)

    def __init__(self, *, vllm_config, prefix: str = ""):
        raise refuse(UnsupportedArchitectureError(not_yet_message(cls_name, SUPPORTED)))

    return _publish(type(TUCKER_CLASS_PREFIX + cls_name, (base,), {"__init__": __init__}))


def unavailable_model_class(module_name: str, cls_name: str, stand_in: type):
    """For a vLLM release without ``module_name``: a class that refuses to be built, with one
    line saying which releases serve it. It subclasses ``stand_in`` (a Tucker model class of
    this release) only so that vLLM's registry can inspect it."""

    def __init__(self, *, vllm_config, prefix: str = ""):
        import vllm

        raise refuse(UnsupportedArchitectureError(unavailable_message(module_name, cls_name, vllm.__version__)))

    return _publish(type(TUCKER_CLASS_PREFIX + cls_name, (stand_in,), {"__init__": __init__}))


def _publish(cls: type) -> type:
    """Make a generated class importable by name from this module (vLLM pickles the config
    and model classes into its engine and worker processes)."""
    cls.__module__ = __name__
    globals()[cls.__name__] = cls
    return cls


def register_configs() -> None:
    """``tuckerize_<model_type>`` -> a subclass of transformers' config class, with AutoConfig."""
    from transformers import CONFIG_MAPPING, AutoConfig

    for arch in ARCHITECTURES:
        for model_type in arch.model_types:
            tucker_type = TUCKER_TYPE_PREFIX + model_type
            if tucker_type in CONFIG_MAPPING or model_type not in CONFIG_MAPPING:
                continue
            base = CONFIG_MAPPING[model_type]
            cls = _publish(type(TUCKER_CLASS_PREFIX + base.__name__, (base,), {"model_type": tucker_type}))
            AutoConfig.register(tucker_type, cls)


def tensor_shapes(model: Any) -> list[list[Any]]:
    """``[[name, shape], ...]`` of every parameter and buffer of a loaded vLLM model, e.g.
    ``LLM(...).apply_model(tensor_shapes)``: one list per rank, to check what each rank holds."""
    named = list(model.named_parameters()) + list(model.named_buffers())
    return [[name, list(t.shape)] for name, t in named]


def weight_bytes(model: Any) -> dict[str, int]:
    """Bytes of every parameter and buffer of a loaded vLLM model (``all``) and of its MoE
    blocks (``moe``: router and experts, with the per-expert cores formed at load), e.g.
    ``LLM(...).apply_model(weight_bytes)``: one dict per rank."""
    named = list(model.named_parameters()) + list(model.named_buffers())
    moe = sum(t.numel() * t.element_size() for n, t in named if ".mlp." in n)
    return {"all": sum(t.numel() * t.element_size() for _, t in named), "moe": moe}


def register_all() -> None:
    from vllm import ModelRegistry

    register_configs()
    supported = set(ModelRegistry.get_supported_archs())
    built, missing = [], []
    for name in SUPPORTED:
        cls_name = TUCKER_CLASS_PREFIX + SUPPORTED[name][1]
        if cls_name not in supported:
            try:
                built.append(tucker_model_class(name))
            except ModuleNotFoundError:  # this vLLM release has no such model module (0.34: olmoe)
                missing.append(name)
                continue
            ModelRegistry.register_model(cls_name, built[-1])
    for name in missing:
        if built:
            module_name, cls_name = SUPPORTED[name][:2]
            ModelRegistry.register_model(TUCKER_CLASS_PREFIX + cls_name,
                                         unavailable_model_class(module_name, cls_name, built[0]))
    for name in NOT_YET:
        cls_name = TUCKER_CLASS_PREFIX + NOT_YET[name][1]
        if cls_name not in supported:
            try:
                ModelRegistry.register_model(cls_name, unsupported_model_class(name))
            except (ImportError, AttributeError):  # a vLLM build without this model
                continue


# Unpickling a generated class in another process imports this module: build them now.
register_configs()

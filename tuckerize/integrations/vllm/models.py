"""Tucker model classes for vLLM: vLLM's own model, only its MoE blocks replaced.

For each supported architecture, ``Tuckerize<Original>ForCausalLM`` subclasses vLLM's
``<Original>ForCausalLM`` and, while the parent's ``__init__`` builds the model, has the
decoder layers construct a Tucker MoE block instead of vLLM's fused-MoE block (the block's
name in the vLLM module is rebound for the duration of the construction only; vLLM's own
bookkeeping that asks ``isinstance(layer.mlp, <block>)`` during construction sees ours):
:class:`~tuckerize.integrations.vllm.moe.TuckerMoE` for Qwen3-MoE, Mixtral and OLMoE, the
blocks of :mod:`.families` (vLLM's own shared experts and gates around the Tucker experts,
DeepSeek's grouped routing) for Qwen2-MoE, Qwen3-Next and DeepSeek-V2/V3. So vLLM's
FusedMoE, which allocates the dense [E, 2I, H] / [E, H, I] expert weights, is never built.
Attention (MLA, gated delta-net included), KV cache, scheduling, sampling and the server are
vLLM's. Weights load through vLLM's own loader; the factor tensors reach
``TuckerExperts.load_weights`` (DeepSeek's hand-rolled loader is given them by
:func:`~tuckerize.integrations.vllm.families.load_routed_factors`).

The config vLLM parses keeps the original ``model_type`` on the instance (the Tucker type
only selects the config class), so vLLM treats the model as its family wherever it asks
the model type (DeepSeek's MLA, for one).

Architectures of :mod:`tuckerize.arch` that this plugin cannot serve go in :data:`NOT_YET`
(none today): registered with a constructor that raises a one-line error naming what is
supported.
"""

from __future__ import annotations

import contextlib
import importlib
from typing import Any

from tuckerize.arch import ARCHITECTURES, TUCKER_CLASS_PREFIX, TUCKER_TYPE_PREFIX
from tuckerize.errors import UnsupportedArchitectureError
from tuckerize.integrations.vllm.checks import check_loading, not_yet_message, refuse, unavailable_message

#: arch.name -> (vLLM module, model class, MoE block class replaced by a Tucker block)
SUPPORTED = {
    "qwen3_moe": ("vllm.model_executor.models.qwen3_moe", "Qwen3MoeForCausalLM", "Qwen3MoeSparseMoeBlock"),
    "mixtral": ("vllm.model_executor.models.mixtral", "MixtralForCausalLM", "MixtralMoE"),
    "olmoe": ("vllm.model_executor.models.olmoe", "OlmoeForCausalLM", "OlmoeMoE"),
    "qwen2_moe": ("vllm.model_executor.models.qwen2_moe", "Qwen2MoeForCausalLM", "Qwen2MoeSparseMoeBlock"),
    "qwen3_next": ("vllm.model_executor.models.qwen3_next", "Qwen3NextForCausalLM", "Qwen3NextSparseMoeBlock"),
    "deepseek_v2": ("vllm.model_executor.models.deepseek_v2", "DeepseekV2ForCausalLM", "DeepseekV2MoE"),
    "deepseek_v3": ("vllm.model_executor.models.deepseek_v2", "DeepseekV3ForCausalLM", "DeepseekV2MoE"),
}
#: arch.name -> the block of :mod:`.families` standing in for vLLM's (default: TuckerMoE).
FAMILY_BLOCKS = {
    "qwen2_moe": "QwenSharedTuckerMoE",
    "qwen3_next": "QwenSharedTuckerMoE",
    "deepseek_v2": "DeepseekTuckerMoE",
    "deepseek_v3": "DeepseekTuckerMoE",
}
#: Families whose vLLM loader is hand-rolled over the model's parameters (the factors are buffers).
OWN_LOADER = frozenset({"deepseek_v2", "deepseek_v3"})
#: Registered so that loading fails with a clear message (vLLM implements them; the plugin not yet).
NOT_YET: dict[str, tuple[str, str]] = {}


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


def _block_class(arch_name: str) -> type:
    from tuckerize.integrations.vllm import families
    from tuckerize.integrations.vllm.moe import TuckerMoE

    return getattr(families, FAMILY_BLOCKS[arch_name]) if arch_name in FAMILY_BLOCKS else TuckerMoE


def tucker_model_class(arch_name: str):
    """``Tuckerize<Original>ForCausalLM`` for ``arch_name``."""
    from tuckerize.integrations.vllm.moe import register_op

    module_name, cls_name, block_name = SUPPORTED[arch_name]
    module = importlib.import_module(module_name)
    base = getattr(module, cls_name)
    block = _block_class(arch_name)

    def __init__(self, *, vllm_config, prefix: str = ""):
        check_loading(vllm_config, SUPPORTED, NOT_YET)  # tucker section, architecture, files: one line
        register_op()
        with _rebound(module, block_name, block):
            base.__init__(self, vllm_config=vllm_config, prefix=prefix)
        _log_experts(self, vllm_config)

    body: dict[str, Any] = {"__init__": __init__, "__doc__": (
        f"vLLM's {cls_name} with Tucker experts ({block.__module__}.{block.__qualname__}).")}
    if arch_name in OWN_LOADER:
        def load_weights(self, weights):
            from tuckerize.integrations.vllm.families import load_routed_factors

            return load_routed_factors(self, weights, lambda rest: base.load_weights(self, rest))

        body["load_weights"] = load_weights
    return _publish(type(TUCKER_CLASS_PREFIX + cls_name, (base,), body))


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
            cls = _publish(type(TUCKER_CLASS_PREFIX + base.__name__, (base,),
                                {"model_type": tucker_type, "__init__": _keep_original_type(base)}))
            AutoConfig.register(tucker_type, cls)


def _keep_original_type(base: type):
    """``__init__`` of a Tucker config class: the instance reports the source ``model_type``
    (vLLM asks it, e.g. to choose MLA for DeepSeek), the class keeps the Tucker one (which
    selects the class from config.json)."""
    def __init__(self, *args: Any, **kwargs: Any):
        base.__init__(self, *args, **kwargs)
        self.model_type = base.model_type

    return __init__


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

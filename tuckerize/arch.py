"""Supported Mixture-of-Experts architectures, as data.

This is the one place that knows how each architecture names its tensors, which of
its layers are MoE layers, its router kind (the routers themselves are registered by
kind in tuckerize.runtime.routing), its shared expert and, for the native runtime, its
attention style. Everything else (reading, writing, sharding, the runtime) asks this
table.

Semantic axes: every projection is stacked as ``[E, H, I]`` (experts, hidden,
intermediate). Hugging Face stores gate/up per expert as ``[I, H]`` (out, in) and
down as ``[H, I]``; so gate and up are transposed when stacked, down is not.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from tuckerize.errors import InputError, UnsupportedArchitectureError

PROJECTIONS = ("gate", "up", "down")
FACTORS = ("U_E", "U_H", "U_I", "core")


@dataclass(frozen=True)
class AttentionStyle:
    """What the native runtime needs to know about an architecture's attention."""

    qkv_bias: bool = False
    #: None, "head" (q/k RMSNorm per head_dim, Qwen3) or "full" (over the projection, OLMoE).
    qk_norm: str | None = None
    #: ``config.sliding_window`` applies (Mixtral).
    sliding_window: bool = False


@dataclass(frozen=True)
class Architecture:
    """How one model family lays out its MoE layers on disk."""

    name: str
    #: Values of ``config.architectures`` (and ``model_type``) that select this entry.
    classes: tuple[str, ...]
    model_types: tuple[str, ...]
    #: Prefix of a MoE block on disk; ``{layer}`` is the decoder layer index.
    moe_prefix: str = "model.layers.{layer}.mlp"
    #: Per-expert tensor names relative to ``moe_prefix``; ``{expert}`` is the expert index.
    expert_weights: Mapping[str, str] = field(
        default_factory=lambda: {
            "gate": "experts.{expert}.gate_proj.weight",
            "up": "experts.{expert}.up_proj.weight",
            "down": "experts.{expert}.down_proj.weight",
        }
    )
    #: Router weight relative to ``moe_prefix``.
    router: str = "gate.weight"
    #: DeepSeek-V3's score correction bias relative to ``moe_prefix`` (router kinds that use one).
    router_bias: str = "gate.e_score_correction_bias"
    #: Decoder layer prefix, embedding, final norm and LM head names.
    layer_prefix: str = "model.layers.{layer}"
    embed_name: str = "model.embed_tokens.weight"
    final_norm_name: str = "model.norm.weight"
    lm_head_name: str = "lm_head.weight"
    #: Attention of the native runtime; None: no native model (the transformers path).
    attention: AttentionStyle | None = None
    #: How MoE layers are chosen: "all", "sparse_step" (Qwen: decoder_sparse_step and
    #: mlp_only_layers) or "first_k_dense" (DeepSeek: first_k_dense_replace, moe_layer_freq).
    layer_rule: str = "all"
    #: Modules in a MoE block that stay dense (shared experts and their gates).
    dense_in_block: tuple[str, ...] = ()
    #: Router semantics (see tuckerize.runtime.routing): "softmax_topk" (renormalised
    #: when config.norm_topk_prob; always for Mixtral), "deepseek_v2", "deepseek_v3".
    router_kind: str = "softmax_topk"
    #: Always renormalise the top-k probabilities, whatever the config says (Mixtral).
    always_norm_topk: bool = False
    #: Shared expert: None, "qwen" (shared_expert MLP times sigmoid(shared_expert_gate)),
    #: or "deepseek" (shared_experts MLP, ungated, moe_intermediate_size * n_shared_experts).
    shared_kind: str | None = None
    #: Module names of the shared expert MLP and of its gate (relative to ``moe_prefix``).
    shared_expert: str | None = None
    shared_expert_gate: str | None = None

    def expert_name(self, layer: int, projection: str, expert: int) -> str:
        return f"{self.moe_prefix.format(layer=layer)}.{self.expert_weights[projection].format(expert=expert)}"

    def fused_names(self, layer: int) -> tuple[str, str]:
        """Names of the fused on-disk layout (transformers v5 in-memory format):
        ``experts.gate_up_proj`` [E, 2I, H] and ``experts.down_proj`` [E, H, I]."""
        prefix = self.moe_prefix.format(layer=layer)
        return f"{prefix}.experts.gate_up_proj", f"{prefix}.experts.down_proj"

    def experts_prefix(self, layer: int) -> str:
        return f"{self.moe_prefix.format(layer=layer)}.experts"

    def router_name(self, layer: int) -> str:
        return f"{self.moe_prefix.format(layer=layer)}.{self.router}"

    def router_bias_name(self, layer: int) -> str:
        return f"{self.moe_prefix.format(layer=layer)}.{self.router_bias}"

    def layer_name(self, layer: int, name: str) -> str:
        """``name`` (relative to the decoder layer, e.g. ``self_attn.q_proj.weight``) in full."""
        return f"{self.layer_prefix.format(layer=layer)}.{name}"

    def moe_name(self, layer: int, name: str) -> str:
        """``name`` relative to the MoE block (e.g. ``shared_expert.up_proj.weight``) in full."""
        return f"{self.moe_prefix.format(layer=layer)}.{name}"

    @property
    def native(self) -> bool:
        """Whether the native runtime (tuckerize.runtime.model) covers this architecture."""
        return self.attention is not None


_QWEN_SHARED = ("shared_expert", "shared_expert_gate")
_QWEN_SHARED_NAMES = {"shared_expert": "shared_expert", "shared_expert_gate": "shared_expert_gate"}

ARCHITECTURES: tuple[Architecture, ...] = (
    Architecture(
        name="qwen3_moe",
        classes=("Qwen3MoeForCausalLM",),
        model_types=("qwen3_moe",),
        layer_rule="sparse_step",
        attention=AttentionStyle(qk_norm="head"),
    ),
    Architecture(
        name="qwen3_next",
        classes=("Qwen3NextForCausalLM",),
        model_types=("qwen3_next",),
        layer_rule="sparse_step",
        dense_in_block=_QWEN_SHARED,
        shared_kind="qwen",
        **_QWEN_SHARED_NAMES,
    ),
    Architecture(
        name="qwen2_moe",
        classes=("Qwen2MoeForCausalLM",),
        model_types=("qwen2_moe",),
        layer_rule="sparse_step",
        dense_in_block=_QWEN_SHARED,
        shared_kind="qwen",
        **_QWEN_SHARED_NAMES,
        attention=AttentionStyle(qkv_bias=True),
    ),
    Architecture(
        name="mixtral",
        classes=("MixtralForCausalLM",),
        model_types=("mixtral",),
        moe_prefix="model.layers.{layer}.block_sparse_moe",
        expert_weights={
            "gate": "experts.{expert}.w1.weight",
            "up": "experts.{expert}.w3.weight",
            "down": "experts.{expert}.w2.weight",
        },
        always_norm_topk=True,
        attention=AttentionStyle(sliding_window=True),
    ),
    Architecture(
        name="deepseek_v2",
        classes=("DeepseekV2ForCausalLM",),
        model_types=("deepseek_v2",),
        layer_rule="first_k_dense",
        dense_in_block=("shared_experts",),
        router_kind="deepseek_v2",
        shared_kind="deepseek",
        shared_expert="shared_experts",
    ),
    Architecture(
        name="deepseek_v3",
        classes=("DeepseekV3ForCausalLM",),
        model_types=("deepseek_v3",),
        layer_rule="first_k_dense",
        dense_in_block=("shared_experts",),
        router_kind="deepseek_v3",
        shared_kind="deepseek",
        shared_expert="shared_experts",
    ),
    Architecture(
        name="olmoe",
        classes=("OlmoeForCausalLM",),
        model_types=("olmoe",),
        attention=AttentionStyle(qk_norm="full"),
    ),
)


def supported_list() -> str:
    return ", ".join(f"{a.classes[0]}" for a in ARCHITECTURES)


def _first_key(config: Mapping[str, Any], keys: tuple[str, ...], what: str) -> Any:
    for key in keys:
        if config.get(key) is not None:
            return config[key]
    raise InputError(f"config.json has no {what} (looked for {', '.join(keys)}); is this a MoE model?")


@dataclass(frozen=True)
class MoESpec:
    """What one checkpoint's config says about its experts."""

    arch: Architecture
    num_layers: int
    moe_layers: tuple[int, ...]
    num_experts: int
    top_k: int
    hidden_size: int
    intermediate_size: int

    @property
    def shape(self) -> tuple[int, int, int]:
        """Stacked (E, H, I) shape of each projection."""
        return (self.num_experts, self.hidden_size, self.intermediate_size)


#: A Tucker checkpoint's config.json names classes and a model type that only tuckerize
#: (and its vLLM plugin, :mod:`tuckerize.integrations.vllm`) know, so that stock vLLM and
#: transformers refuse it instead of loading the dense architecture with missing experts.
#: The original names are kept in ``config["tucker"]["original"]``.
TUCKER_CLASS_PREFIX = "Tuckerize"
TUCKER_TYPE_PREFIX = "tuckerize_"


def original_names(config: Mapping[str, Any]) -> tuple[list[str], str | None]:
    """``(architectures, model_type)`` of the source model: from the ``tucker`` section of a
    Tucker checkpoint's config, else the config's own (an original model, or a Tucker
    checkpoint written before the names were changed)."""
    original = (config.get("tucker") or {}).get("original") or {}
    names = list(original.get("architectures") or config.get("architectures") or [])
    return names, original.get("model_type", config.get("model_type"))


def original_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``config`` with the source model's architectures and model_type restored."""
    names, model_type = original_names(config)
    return {**config, "architectures": names, "model_type": model_type}


def resolve_architecture(config: Mapping[str, Any]) -> Architecture:
    names, model_type = original_names(config)
    for arch in ARCHITECTURES:
        if any(n in arch.classes for n in names) or model_type in arch.model_types:
            return arch
    got = ", ".join(names) or str(model_type)
    raise UnsupportedArchitectureError(
        f"architecture {got} is not supported; supported: {supported_list()}"
    )


def moe_spec(config: Mapping[str, Any]) -> MoESpec:
    """Read the MoE layout from a Hugging Face ``config.json`` dict."""
    arch = resolve_architecture(config)
    # Qwen3-Next and some multimodal wrappers keep the text model under text_config.
    if "text_config" in config and "num_hidden_layers" not in config:
        config = {**config["text_config"], "architectures": config.get("architectures")}
    num_layers = int(_first_key(config, ("num_hidden_layers", "n_layer"), "number of layers"))
    num_experts = int(
        _first_key(config, ("num_experts", "num_local_experts", "n_routed_experts"), "number of experts")
    )
    top_k = int(_first_key(config, ("num_experts_per_tok", "moe_top_k", "top_k"), "experts per token"))
    hidden = int(_first_key(config, ("hidden_size", "d_model"), "hidden size"))
    if config.get("moe_intermediate_size") is not None:
        inter = int(config["moe_intermediate_size"])
    else:
        inter = int(_first_key(config, ("intermediate_size", "ffn_dim"), "expert intermediate size"))

    if arch.layer_rule == "sparse_step":
        step = int(config.get("decoder_sparse_step") or 1)
        dense = set(config.get("mlp_only_layers") or [])
        layers = [
            i for i in range(num_layers) if i not in dense and num_experts > 0 and (i + 1) % step == 0
        ]
    elif arch.layer_rule == "first_k_dense":
        k = int(config.get("first_k_dense_replace") or 0)
        freq = int(config.get("moe_layer_freq") or 1)
        layers = [i for i in range(num_layers) if i >= k and i % freq == 0]
    else:
        layers = list(range(num_layers))
    if not layers or num_experts <= 0:
        raise UnsupportedArchitectureError(
            f"{arch.classes[0]} config has no MoE layers; tuckerize compresses routed experts "
            f"of: {supported_list()}"
        )
    return MoESpec(
        arch=arch,
        num_layers=num_layers,
        moe_layers=tuple(layers),
        num_experts=num_experts,
        top_k=top_k,
        hidden_size=hidden,
        intermediate_size=inter,
    )

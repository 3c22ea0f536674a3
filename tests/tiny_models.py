"""Tiny Mixture-of-Experts checkpoints built with transformers' own classes.

``build_tiny(arch, folder)`` instantiates a randomly initialised model of one of
the supported architectures from its real config class and writes it with
``save_pretrained``, so tensor names on disk are exactly what Hugging Face writes
(e.g. Mixtral's ``block_sparse_moe.experts.N.w1.weight``). Every model is small
(vocab 64, hidden 32, 2-3 layers, 4-8 experts, expert intermediate 16) and seeded.

``build_fused(folder)`` writes a Qwen3-MoE checkpoint in the fused layout
(``mlp.experts.gate_up_proj [E, 2I, H]``, ``mlp.experts.down_proj [E, H, I]``),
which is transformers v5's in-memory state dict saved as is.

Runtime tests reuse these builders.

``VLLM_FAMILIES`` holds, per family the vLLM plugin serves beyond the demo models, the
overrides that make a tiny checkpoint vLLM's CPU build runs (attention heads of 32 or
more; DeepSeek's CPU MLA with the real head dims; Qwen3-Next's CPU delta-net with heads of
128), with the routing settings of the real releases (DeepSeek-V3's ``topk_method: noaux_tc``
and ``scoring_func: sigmoid``, which transformers' DeepseekV3Config does not save by itself).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

VOCAB = 64
HIDDEN = 32
MOE_INTER = 16

_COMMON: dict[str, Any] = dict(
    vocab_size=VOCAB,
    hidden_size=HIDDEN,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    tie_word_embeddings=False,
)

#: Per-architecture: transformers config class, model class, and config kwargs.
ARCH_KWARGS: dict[str, dict[str, Any]] = {
    "qwen3_moe": dict(
        config="Qwen3MoeConfig",
        model="Qwen3MoeForCausalLM",
        kwargs=dict(
            num_hidden_layers=2,
            intermediate_size=48,
            moe_intermediate_size=MOE_INTER,
            num_experts=8,
            num_experts_per_tok=2,
            head_dim=8,
            norm_topk_prob=True,
        ),
    ),
    "qwen2_moe": dict(
        config="Qwen2MoeConfig",
        model="Qwen2MoeForCausalLM",
        kwargs=dict(
            num_hidden_layers=2,
            intermediate_size=48,
            moe_intermediate_size=MOE_INTER,
            shared_expert_intermediate_size=24,
            num_experts=6,
            num_experts_per_tok=2,
        ),
    ),
    "mixtral": dict(
        config="MixtralConfig",
        model="MixtralForCausalLM",
        kwargs=dict(
            num_hidden_layers=2,
            intermediate_size=MOE_INTER,
            num_local_experts=4,
            num_experts_per_tok=2,
            head_dim=8,
        ),
    ),
    "olmoe": dict(
        config="OlmoeConfig",
        model="OlmoeForCausalLM",
        kwargs=dict(
            num_hidden_layers=2,
            intermediate_size=MOE_INTER,
            num_experts=8,
            num_experts_per_tok=2,
        ),
    ),
    "deepseek_v2": dict(
        config="DeepseekV2Config",
        model="DeepseekV2ForCausalLM",
        kwargs=dict(
            num_hidden_layers=3,
            intermediate_size=48,
            moe_intermediate_size=MOE_INTER,
            n_routed_experts=8,
            n_shared_experts=1,
            num_experts_per_tok=2,
            first_k_dense_replace=1,
            kv_lora_rank=16,
            q_lora_rank=None,
            qk_nope_head_dim=8,
            qk_rope_head_dim=8,
            v_head_dim=8,
            head_dim=8,
            n_group=1,
            topk_group=1,
            topk_method="greedy",
        ),
    ),
    "deepseek_v3": dict(
        config="DeepseekV3Config",
        model="DeepseekV3ForCausalLM",
        kwargs=dict(
            num_hidden_layers=3,
            intermediate_size=48,
            moe_intermediate_size=MOE_INTER,
            n_routed_experts=8,
            n_shared_experts=1,
            num_experts_per_tok=2,
            first_k_dense_replace=1,
            kv_lora_rank=16,
            q_lora_rank=24,
            qk_nope_head_dim=8,
            qk_rope_head_dim=8,
            v_head_dim=8,
            n_group=1,
            topk_group=1,
        ),
    ),
    "qwen3_next": dict(
        config="Qwen3NextConfig",
        model="Qwen3NextForCausalLM",
        kwargs=dict(
            num_hidden_layers=2,
            intermediate_size=48,
            moe_intermediate_size=MOE_INTER,
            shared_expert_intermediate_size=24,
            num_experts=4,
            num_experts_per_tok=2,
            head_dim=8,
            layer_types=["linear_attention", "full_attention"],
            linear_conv_kernel_dim=4,
            linear_key_head_dim=8,
            linear_value_head_dim=8,
            linear_num_key_heads=2,
            linear_num_value_heads=4,
        ),
    ),
    # Not a MoE model: used to check the "unsupported architecture" error.
    "llama": dict(
        config="LlamaConfig",
        model="LlamaForCausalLM",
        kwargs=dict(num_hidden_layers=2, intermediate_size=48, head_dim=8),
    ),
}

MOE_ARCHS = tuple(a for a in ARCH_KWARGS if a != "llama")

#: DeepSeek's multi-head latent attention at the real releases' head dims (vLLM's CPU MLA
#: kernels are built for them): latent 512, rope 64, nope 128, value 128.
_MLA = dict(kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128, head_dim=64)

#: family -> (dtype vLLM's CPU build serves it in, config overrides on ARCH_KWARGS). Two
#: attention heads everywhere, so that tensor parallelism of 2 splits them.
VLLM_FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "qwen2_moe": ("float32", dict(
        hidden_size=64, num_attention_heads=2, num_key_value_heads=2, intermediate_size=96,
        moe_intermediate_size=32, shared_expert_intermediate_size=48, num_experts=8, norm_topk_prob=False)),
    "qwen3_next": ("bfloat16", dict(
        hidden_size=64, num_attention_heads=2, num_key_value_heads=2, head_dim=128, intermediate_size=96,
        moe_intermediate_size=32, shared_expert_intermediate_size=48, num_experts=8, norm_topk_prob=True,
        linear_key_head_dim=128, linear_value_head_dim=128, linear_num_key_heads=2, linear_num_value_heads=2)),
    "deepseek_v2": ("bfloat16", dict(
        hidden_size=64, num_attention_heads=2, num_key_value_heads=2, intermediate_size=96,
        moe_intermediate_size=32, q_lora_rank=None, topk_method="group_limited_greedy", scoring_func="softmax",
        n_group=4, topk_group=2, routed_scaling_factor=2.0, **_MLA)),
    "deepseek_v3": ("bfloat16", dict(
        hidden_size=64, num_attention_heads=2, num_key_value_heads=2, intermediate_size=96,
        moe_intermediate_size=32, q_lora_rank=96, topk_method="noaux_tc", scoring_func="sigmoid",
        n_group=4, topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True, **_MLA)),
}

def _tokenizer_json() -> str:
    """A real (loadable) character-level WordLevel tokenizer with exactly VOCAB tokens."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    chars = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ .,!?'\n:;-"
    vocab = {"<unk>": 0, "<eos>": 1, **{c: i + 2 for i, c in enumerate(chars[: VOCAB - 2])}}
    assert len(vocab) == VOCAB
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return tok.to_str()


#: Small side files a real checkpoint ships; tuckerize copies them verbatim.
SIDE_FILES = {
    "tokenizer_config.json": json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 128,
         "eos_token": "<eos>", "unk_token": "<unk>"}
    ),
    "special_tokens_map.json": json.dumps({"eos_token": "<eos>", "unk_token": "<unk>"}),
    "tokenizer.json": _tokenizer_json(),
}


def make_config(arch: str, **overrides: Any):
    import transformers

    entry = ARCH_KWARGS[arch]
    kwargs = {**_COMMON, **entry["kwargs"], **overrides}
    config = getattr(transformers, entry["config"])(**kwargs)
    config.architectures = [entry["model"]]
    return config


def make_model(arch: str, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides: Any):
    import transformers

    config = make_config(arch, **overrides)
    torch.manual_seed(seed)
    model = getattr(transformers, ARCH_KWARGS[arch]["model"])(config)
    return model.to(dtype).eval()


def build_tiny(
    arch: str,
    folder: str | Path,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    side_files: bool = True,
    **overrides: Any,
) -> Path:
    """Write a tiny ``arch`` checkpoint with ``save_pretrained`` into ``folder``."""
    folder = Path(folder)
    model = make_model(arch, seed=seed, dtype=dtype, **overrides)
    model.save_pretrained(folder)
    if side_files:
        if model.generation_config is not None and not (folder / "generation_config.json").is_file():
            model.generation_config.save_pretrained(folder)
        for name, text in SIDE_FILES.items():
            (folder / name).write_text(text)
    return folder


def build_fused(
    folder: str | Path,
    arch: str = "qwen3_moe",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    per_expert_folder: str | Path | None = None,
    **overrides: Any,
) -> Path:
    """Write the in-memory (fused) state dict of a tiny model with safetensors' ``save_file``.

    transformers v5 keeps experts fused in memory: ``mlp.experts.gate_up_proj [E, 2I, H]``
    (gate rows first) and ``mlp.experts.down_proj [E, H, I]``; ``save_pretrained`` splits
    them per expert on disk, ``save_file(model.state_dict())`` does not. With
    ``per_expert_folder`` the same model is also written with ``save_pretrained`` there.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = make_model(arch, seed=seed, dtype=dtype, **overrides)
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in state), "not a fused in-memory layout"
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    model.config.save_pretrained(folder)
    for name, text in SIDE_FILES.items():
        (folder / name).write_text(text)
    if per_expert_folder is not None:
        model.save_pretrained(per_expert_folder)
        for name, text in SIDE_FILES.items():
            (Path(per_expert_folder) / name).write_text(text)
    return folder


def read_config(folder: str | Path) -> dict[str, Any]:
    return json.loads((Path(folder) / "config.json").read_text())

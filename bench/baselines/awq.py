"""AWQ int4 (group 128 -> min(128, in_features)) of a demo model's routed experts with
llmcompressor's AWQModifier (activation-aware scales, grid-searched, then round-to-nearest by
its QuantizationModifier), on CPU in llmcompressor's own virtual environment:

    /work/venvs/compare/bin/python bench/baselines/awq.py SRC OUT [--samples 16 --seqlen 256]

Same scheme, calibration text and windows as gptq.py (bench/baselines/common.py). The AWQ
mappings are the experts' part of llmcompressor's Qwen3-MoE mapping, used for both models
(its registry has none for Mixtral, whose fallback, the dense default, would smooth attention
and leave the router out of the layernorm's balance, changing the routing). Under transformers
5.17 llmcompressor linearises both models' fused experts into ``mlp.experts.N.gate_proj /
up_proj / down_proj`` Linears (Mixtral's older ``w1 / w3 / w2`` are matched too):

* ``post_attention_layernorm`` -> the router and every expert's gate and up projection (one
  scale vector per layer, shared by the layer's experts: they share that input; the router is
  scaled to compensate and stays unquantised);
* each expert's up projection -> its down projection (one scale vector per expert).

Attention is not smoothed (its mappings are left out), so only expert matrices change. The
layernorm's smoothing is folded back into the experts: OUT keeps the source's layernorm and
router and stores, per expert, ``Q(W diag(s)) diag(s)^-1`` for gate and up (``s`` the layer's
scales, ``Q`` int4 quantise-dequantise with the group's scale and zero) and
``Q(W_down diag(t))`` for down, up's ``Q`` having been taken of ``diag(t)^-1 W_up diag(s)``
(``t`` the expert's scales): it computes what llmcompressor's smoothed, quantised model
computes (checked on the logits of one calibration window, ``awq.json``). Stored as AWQ
stores it (int4 codes, one float16 scale and zero per group, the smoothed layernorm vector in
place of the original) it takes RTN int4's expert bytes.

llmcompressor's MoE calibration (``moe_calibrate_all_experts``, its default, as in gptq.py)
sends every calibration token through every expert; its AWQ statistics and grid-search losses
are over all those tokens, not only the tokens routed to each expert. It has duo scaling on
(``s = mean|x|^a / mean|w|^(1-a)``, ``a`` on a grid of ``--n-grid`` points in [0, 1)).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

GATE_UP = r"re:.*mlp\.experts\.\d+\.(gate_proj|up_proj|w1|w3)$"


def mappings():
    from llmcompressor.modifiers.transform.awq import AWQMapping

    return [AWQMapping(r"re:.*post_attention_layernorm$",
                       [r"re:.*mlp\.gate$", r"re:.*mlp\.experts\.\d+\.(gate_proj|w1)$",
                        r"re:.*mlp\.experts\.\d+\.(up_proj|w3)$"]),
            AWQMapping(r"re:.*mlp\.experts\.\d+\.(up_proj|w3)$", [r"re:.*mlp\.experts\.\d+\.(down_proj|w2)$"])]


def main() -> None:
    ap = common.arg_parser(samples=16)
    ap.add_argument("--n-grid", type=int, default=20, help="AWQ's grid of alpha in [0, 1)")
    ap.add_argument("--routed-only", action="store_true", help="calibrate each expert on its routed tokens only "
                    "(moe_calibrate_all_experts=False; default: every token through every expert, as gptq.py)")
    args = ap.parse_args()

    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(args.src))
    ds = common.calibration_dataset(tok, args.samples, args.seqlen)
    model = AutoModelForCausalLM.from_pretrained(str(args.src), dtype=torch.float32)
    groups = common.group_sizes(model.config, args.group)
    norms = {n: m.weight.detach().clone() for n, m in model.named_modules() if n.endswith("post_attention_layernorm")}
    if not torch.cuda.is_available():
        # AWQ pins its cached activations for faster host-to-device copies; a CPU-only torch
        # raises on pin_memory(), and on CPU there is nothing to copy
        from llmcompressor.pipelines.cache import IntermediatesCache

        IntermediatesCache.pin_memory = lambda self, batch_index, input_names=None: None
    recipe = [AWQModifier(mappings=mappings(), n_grid=args.n_grid, offload_device=None),
              QuantizationModifier(config_groups=common.int_schemes(groups, args.bits), ignore=common.IGNORE)]
    oneshot(model=model, dataset=ds, recipe=recipe, max_seq_length=args.seqlen, num_calibration_samples=len(ds),
            moe_calibrate_all_experts=not args.routed_only)

    modules = dict(model.named_modules())
    weights, levels, smoothed = {}, 0, 0
    for layer, e, proj, name, mod in common.expert_modules(model):
        qargs = mod.quantization_scheme.weights
        w = fake_quantize(mod.weight.detach().float(), mod.weight_scale.float(), mod.weight_zero_point, qargs)
        levels = max(levels, common.levels_per_group(w, groups[proj]))
        if proj in ("gate", "up"):  # fold the layernorm's 1/s back into the input columns
            norm = name.split(".mlp.")[0] + ".post_attention_layernorm"
            before, after = norms[norm].float(), modules[norm].weight.detach().float()
            smoothed += int(not torch.equal(before, after))
            w = w * (after / before)[None, :]
        weights[(layer, e, proj)] = w
    if levels > 2**args.bits:
        raise SystemExit(f"AWQ left {levels} levels in a group (int{args.bits} has {2**args.bits})")
    if smoothed == 0:
        raise SystemExit("AWQ changed no post_attention_layernorm: its layernorm -> experts mapping did not apply")
    info = {"bits": args.bits, "group": groups, "samples": len(ds), "seqlen": args.seqlen, "n_grid": args.n_grid,
            "routed_only": args.routed_only, "matrices": len(weights), "max_levels_per_group": levels}
    common.write_dense(args.src, args.out, weights, "awq", info)

    # the written checkpoint (original layernorms and router, folded experts) computes what
    # llmcompressor's smoothed, fake-quantised model computes: logits on one calibration window
    ids = torch.tensor(ds[0]["input_ids"])[None]
    with torch.no_grad():
        want = model(ids).logits.float()
        got = AutoModelForCausalLM.from_pretrained(str(args.out), dtype=torch.float32)(ids).logits.float()
    info["logits_rel_err_vs_llmcompressor"] = float((got - want).norm() / want.norm())
    if info["logits_rel_err_vs_llmcompressor"] > 1e-4:
        raise SystemExit(f"the written AWQ checkpoint differs from llmcompressor's model: {info}")
    (args.out / "awq.json").write_text(json.dumps(info))


if __name__ == "__main__":
    main()

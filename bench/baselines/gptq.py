"""GPTQ int4, int3 or int2 (``--bits``; group ``--group`` 128 -> min(128, in_features)) of a demo
model's routed experts with llmcompressor, run on CPU in its own virtual environment (it pins its own dependencies):

    /work/venvs/compare/bin/python bench/baselines/gptq.py SRC OUT [--bits 4 --group 128 --samples 128 --seqlen 256]

Writes OUT as a dense checkpoint in the source's format (dequantised weights, float32), so
bench/compare.py scores it with the product's evaluation code like every other row. The
calibration text is the same as every other calibrated row's (tuckerize/demo/calibration.txt).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def main() -> None:
    args = common.arg_parser(samples=128).parse_args()

    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(args.src))
    ds = common.calibration_dataset(tok, args.samples, args.seqlen)
    model = AutoModelForCausalLM.from_pretrained(str(args.src), torch_dtype=torch.float32)
    groups = common.group_sizes(model.config, args.group)
    recipe = GPTQModifier(config_groups=common.int_schemes(groups, args.bits), ignore=common.IGNORE)
    oneshot(model=model, dataset=ds, recipe=recipe, max_seq_length=args.seqlen, num_calibration_samples=len(ds))

    # GPTQ leaves each quantised Linear's weight as its dequantised value
    weights, levels = {}, 0
    for layer, e, proj, _, mod in common.expert_modules(model):
        w = mod.weight.detach().float()
        levels = max(levels, common.levels_per_group(w, groups[proj]))
        weights[(layer, e, proj)] = w
    if levels > 2**args.bits:
        raise SystemExit(f"GPTQ left {levels} levels in a group (int{args.bits} has {2**args.bits})")
    common.write_dense(args.src, args.out, weights, "gptq", {"bits": args.bits, "group": groups, "samples": len(ds),
                                                             "seqlen": args.seqlen,
                                                             "matrices": len(weights), "max_levels_per_group": levels})


if __name__ == "__main__":
    main()

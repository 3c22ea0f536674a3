"""GPTQ int4 (group 128 -> min(128, in_features)) of a demo model's routed experts with
llmcompressor, run on CPU in its own virtual environment (it pins its own dependencies):

    /work/venvs/compare/bin/python bench/baselines/gptq.py SRC OUT [--samples 128 --seqlen 256]

Writes OUT as a dense checkpoint in the source's format (dequantised weights, float32), so
bench/compare.py scores it with the product's evaluation code like every other row. The
calibration text is the same as every other calibrated row's (tuckerize/demo/calibration.txt).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("src", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--group", type=int, default=128)
    args = ap.parse_args()

    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(args.src))
    ids = tok((REPO / "tuckerize" / "demo" / "calibration.txt").read_text(), add_special_tokens=False)["input_ids"]
    n = len(ids) // args.seqlen
    starts = torch.linspace(0, n - 1, args.samples).round().long().tolist()  # as tuckerize's calibration_tokens
    rows = [ids[s * args.seqlen:(s + 1) * args.seqlen] for s in starts]
    ds = Dataset.from_dict({"input_ids": rows, "attention_mask": [[1] * args.seqlen for _ in rows]})
    model = AutoModelForCausalLM.from_pretrained(str(args.src), torch_dtype=torch.float32)
    # group = min(group, in_features) per projection, as bench/compare.py's RTN rows and its byte
    # count: gate/up read the hidden size, down the expert intermediate size.
    inter = getattr(model.config, "moe_intermediate_size", None) or model.config.intermediate_size
    groups = {"gate_up": (min(args.group, model.config.hidden_size), r"(gate_proj|up_proj|w1|w3)"),
              "down": (min(args.group, inter), r"(down_proj|w2)")}

    def scheme(group: int) -> dict:
        return {"weights": {"num_bits": 4, "type": "int", "symmetric": False, "strategy": "group",
                            "group_size": group}}

    recipe = GPTQModifier(config_groups={k: {"targets": [rf"re:.*experts\.\d+\.{names}$"], **scheme(g)}
                                         for k, (g, names) in groups.items()},
                          ignore=["lm_head", "re:.*self_attn.*", "re:.*mlp.gate$", "re:.*router.*"])
    oneshot(model=model, dataset=ds, recipe=recipe, max_seq_length=args.seqlen, num_calibration_samples=len(rows))

    # GPTQ leaves each quantised Linear's weight as its dequantised value; write them back
    # under the on-disk names (tuckerize's architecture table) into a copy of the source.
    sys.path.insert(0, str(REPO))
    from safetensors.torch import load_file, save_file

    from tuckerize.arch import moe_spec
    from tuckerize.checkpoint import SIDE_FILES, load_config

    spec = moe_spec(load_config(args.src))
    proj = {"gate_proj": "gate", "w1": "gate", "up_proj": "up", "w3": "up", "down_proj": "down", "w2": "down"}
    tensors = load_file(str(args.src / "model.safetensors"))
    done, levels = 0, 0
    pat = re.compile(r"layers\.(\d+)\..*experts\.(\d+)\.(\w+)$")
    for name, mod in model.named_modules():
        m = pat.search(name)
        if m and isinstance(mod, torch.nn.Linear) and m.group(3) in proj:
            key = spec.arch.expert_name(int(m.group(1)), proj[m.group(3)], int(m.group(2)))
            w = mod.weight.detach().float()
            assert tuple(w.shape) == tuple(tensors[key].shape), (key, w.shape, tensors[key].shape)
            group = groups["down" if proj[m.group(3)] == "down" else "gate_up"][0]
            levels = max(levels, int(w[0, :group].unique().numel()))
            tensors[key] = w.to(tensors[key].dtype).contiguous()
            done += 1
    want = 3 * spec.num_experts * len(spec.moe_layers)
    if done != want or levels > 16:
        raise SystemExit(f"GPTQ wrote {done} of {want} expert matrices (max {levels} levels per group)")
    args.out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(args.out / "model.safetensors"), metadata={"format": "pt"})
    shutil.copyfile(args.src / "config.json", args.out / "config.json")
    for f in SIDE_FILES:
        if (args.src / f).is_file():
            shutil.copyfile(args.src / f, args.out / f)
    (args.out / "gptq.json").write_text(json.dumps({"group": {k: g for k, (g, _) in groups.items()},
                                                    "samples": len(rows), "seqlen": args.seqlen,
                                                    "matrices": done, "max_levels_per_group": levels}))


if __name__ == "__main__":
    main()

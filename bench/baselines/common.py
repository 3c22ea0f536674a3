"""What the llmcompressor baselines (gptq.py, awq.py) share: the calibration windows of the
product's calibration text, the int4 group size, the names of the expert Linears that
llmcompressor's linearised MoE models expose, and writing the dequantised expert weights back
into a copy of the source checkpoint (its own format, so bench/compare.py scores it with the
product's evaluation code like every other row).

Runs in llmcompressor's virtual environment (torch, transformers, datasets, safetensors) with
the repository on ``sys.path`` for ``tuckerize.arch`` / ``tuckerize.checkpoint``.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# linearised expert Linear names (Qwen3-MoE: gate_proj/up_proj/down_proj; Mixtral: w1/w3/w2)
PROJ = {"gate_proj": "gate", "w1": "gate", "up_proj": "up", "w3": "up", "down_proj": "down", "w2": "down"}
EXPERT = re.compile(r"layers\.(\d+)\..*experts\.(\d+)\.(\w+)$")
IGNORE = ["lm_head", "re:.*self_attn.*", "re:.*mlp.gate$", "re:.*router.*"]  # experts only


def calibration_dataset(tok, samples: int, seqlen: int):
    """``samples`` windows of ``seqlen`` tokens of tuckerize/demo/calibration.txt, spread evenly
    as tuckerize's ``calibration_tokens`` spreads them; a ``datasets.Dataset``."""
    from datasets import Dataset

    ids = tok((REPO / "tuckerize" / "demo" / "calibration.txt").read_text(), add_special_tokens=False)["input_ids"]
    n = len(ids) // seqlen
    starts = torch.linspace(0, n - 1, samples).round().long().tolist()
    rows = [ids[s * seqlen:(s + 1) * seqlen] for s in starts]
    return Dataset.from_dict({"input_ids": rows, "attention_mask": [[1] * seqlen for _ in rows]})


#: linearised expert Linear names per projection, as llmcompressor target regexes
TARGETS = {"gate": "(gate_proj|w1)", "up": "(up_proj|w3)", "down": "(down_proj|w2)"}


def group_sizes(config, group: int = 128) -> dict[str, int]:
    """``min(group, in_features)`` per projection, as bench/compare.py's RTN rows and their byte
    count: gate and up read the hidden size, down the expert intermediate size (64 on the demo
    models)."""
    inter = getattr(config, "moe_intermediate_size", None) or config.intermediate_size
    return {"gate": min(group, config.hidden_size), "up": min(group, config.hidden_size), "down": min(group, inter)}


def int_schemes(groups: dict[str, int], bits: int = 4) -> dict:
    """llmcompressor ``config_groups``: asymmetric ``bits``-bit integers with one scale and
    zero per group along the input axis, one group size per projection, experts only."""
    return {f"experts_{p}": {"targets": [rf"re:.*experts\.\d+\.{TARGETS[p]}$"],
                             "weights": {"num_bits": bits, "type": "int", "symmetric": False, "strategy": "group",
                                         "group_size": g}}
            for p, g in groups.items()}


def expert_modules(model):
    """``(layer, expert, proj, module_name, Linear)`` for every routed-expert Linear, proj in
    gate/up/down."""
    for name, mod in model.named_modules():
        m = EXPERT.search(name)
        if m and isinstance(mod, torch.nn.Linear) and m.group(3) in PROJ:
            yield int(m.group(1)), int(m.group(2)), PROJ[m.group(3)], name, mod


def write_dense(src: Path, out: Path, weights: dict[tuple[int, int, str], torch.Tensor], what: str,
                info: dict) -> None:
    """Copy ``src`` to ``out`` with every expert matrix replaced by ``weights[(layer, expert,
    proj)]`` (``[out_features, in_features]``, stored in the source's dtype), plus
    ``{what}.json`` holding ``info``. Refuses a partial set of experts."""
    from safetensors.torch import load_file, save_file

    from tuckerize.arch import moe_spec
    from tuckerize.checkpoint import SIDE_FILES, load_config

    spec = moe_spec(load_config(src))
    want = 3 * spec.num_experts * len(spec.moe_layers)
    if len(weights) != want:
        raise SystemExit(f"{what} produced {len(weights)} of {want} expert matrices")
    tensors = load_file(str(src / "model.safetensors"))
    for (layer, e, proj), w in weights.items():
        key = spec.arch.expert_name(layer, proj, e)
        if tuple(w.shape) != tuple(tensors[key].shape):
            raise SystemExit(f"{what}: {key} is {tuple(w.shape)}, the source's {tuple(tensors[key].shape)}")
        tensors[key] = w.detach().to(tensors[key].dtype).contiguous()
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    shutil.copyfile(src / "config.json", out / "config.json")
    for f in SIDE_FILES:
        if (src / f).is_file():
            shutil.copyfile(src / f, out / f)
    (out / f"{what}.json").write_text(json.dumps(info))


def levels_per_group(w: torch.Tensor, group: int) -> int:
    """The most distinct values in one group of one row of ``w`` (at most 2**bits)."""
    return int(max(g.unique().numel() for g in w.reshape(w.shape[0], -1, group)[:4].reshape(-1, group)))


def arg_parser(samples: int):
    """The arguments every baseline script takes: SRC OUT [--samples --seqlen --group --bits]."""
    import argparse
    from pathlib import Path

    ap = argparse.ArgumentParser()
    ap.add_argument("src", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--samples", type=int, default=samples)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--group", type=int, default=128)
    if samples:  # the llmcompressor scripts (halfquadratic.py adds its own --bits)
        ap.add_argument("--bits", type=int, default=4, choices=[2, 3, 4, 8])
    return ap


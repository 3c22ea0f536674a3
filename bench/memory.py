"""Peak resident memory of ``tuckerize decompose`` on Qwen3-30B-A3B's expert shapes.

Generates locally (no download) a bf16 checkpoint with Qwen3-30B-A3B's real layer
shapes (hidden 2048, 128 experts of intermediate 768, vocabulary 151936, 32/4 heads,
head_dim 128), one safetensors file per layer plus an index, for the largest layer
count asked for; then runs ``tuckerize decompose --ranks 64,512,256`` in a fresh
process on checkpoints of each layer count and reads that process's peak RSS.
The peak must stay below 4 GiB and must not grow with the number of layers.

    python bench/memory.py                    # 2 and 4 layers, about 5 minutes
    python bench/memory.py --layers 1,2 --dir /tmp/q3shape
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

H, I, E, V = 2048, 768, 128, 151936
HEADS, KV, HD = 32, 4, 128


def config(layers: int, vocab: int = V) -> dict:
    from transformers import Qwen3MoeConfig

    cfg = Qwen3MoeConfig(
        vocab_size=vocab, hidden_size=H, intermediate_size=6144, moe_intermediate_size=I, num_hidden_layers=layers,
        num_attention_heads=HEADS, num_key_value_heads=KV, head_dim=HD, num_experts=E, num_experts_per_tok=8,
        norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], rope_theta=1e6, tie_word_embeddings=False,
    )
    d = cfg.to_dict()
    d["architectures"] = ["Qwen3MoeForCausalLM"]
    d["torch_dtype"] = "bfloat16"
    return d


def write_checkpoint(folder: Path, layers: int, gen: torch.Generator, vocab: int = V) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    bf = torch.bfloat16
    weight_map = {}
    files = layers + 1

    def rnd(*shape, scale=0.02):
        return (torch.randn(*shape, generator=gen) * scale).to(bf)

    name = f"model-00001-of-{files:05d}.safetensors"
    rest = {"model.embed_tokens.weight": rnd(vocab, H), "lm_head.weight": rnd(vocab, H), "model.norm.weight": torch.ones(H, dtype=bf)}
    save_file(rest, str(folder / name), metadata={"format": "pt"})
    weight_map.update({k: name for k in rest})
    del rest
    for layer in range(layers):
        p = f"model.layers.{layer}."
        t = {
            p + "input_layernorm.weight": torch.ones(H, dtype=bf),
            p + "post_attention_layernorm.weight": torch.ones(H, dtype=bf),
            p + "self_attn.q_proj.weight": rnd(HEADS * HD, H),
            p + "self_attn.k_proj.weight": rnd(KV * HD, H),
            p + "self_attn.v_proj.weight": rnd(KV * HD, H),
            p + "self_attn.o_proj.weight": rnd(H, HEADS * HD),
            p + "self_attn.q_norm.weight": torch.ones(HD, dtype=bf),
            p + "self_attn.k_norm.weight": torch.ones(HD, dtype=bf),
            p + "mlp.gate.weight": rnd(E, H),
        }
        # Experts share a low-rank structure, as trained experts do, plus noise.
        for proj, shape in (("gate_proj", (I, H)), ("up_proj", (I, H)), ("down_proj", (H, I))):
            base = rnd(*shape)
            for e in range(E):
                t[f"{p}mlp.experts.{e}.{proj}.weight"] = (base.float() + 0.5 * rnd(*shape).float()).to(bf)
        name = f"model-{layer + 2:05d}-of-{files:05d}.safetensors"
        save_file(t, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in t})
        del t
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(config(layers, vocab), indent=1))


def subset(full: Path, folder: Path, layers: int) -> None:
    """A checkpoint of the first ``layers`` layers of ``full``, by hard links (no copy)."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    index = json.loads((full / "model.safetensors.index.json").read_text())
    keep = {}
    for k, f in index["weight_map"].items():
        parts = k.split(".")
        if len(parts) > 2 and parts[1] == "layers" and int(parts[2]) >= layers:
            continue
        keep[k] = f
    for f in set(keep.values()):
        os.link(full / f, folder / f)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": keep}))
    (folder / "config.json").write_text(json.dumps(config(layers), indent=1))


def peak_rss_of(cmd: list[str]) -> tuple[float, float]:
    """Run ``cmd`` in a child of a fresh wrapper process; its peak RSS in GiB and its wall time."""
    wrapper = (
        "import resource, subprocess, sys, time, json; t=time.time(); "
        "r=subprocess.run(sys.argv[1:]); "
        "print(json.dumps({'rc': r.returncode, 'maxrss_kib': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, "
        "'seconds': time.time()-t}))"
    )
    out = subprocess.run([sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True)
    info = json.loads(out.stdout.strip().splitlines()[-1])
    if info["rc"] != 0:
        raise SystemExit(f"decompose failed: {out.stderr[-2000:]}")
    return info["maxrss_kib"] / 2**20, info["seconds"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", default="2,4")
    ap.add_argument("--dir", default="/tmp/tuckerize-bench-qwen3-shapes")
    ap.add_argument("--ranks", default="64,512,256")
    ap.add_argument("--keep", action="store_true", help="keep the generated checkpoints")
    args = ap.parse_args()
    counts = sorted(int(x) for x in args.layers.split(","))
    root = Path(args.dir)
    full = root / f"full-{counts[-1]}"
    if not (full / "config.json").is_file():
        t = time.time()
        write_checkpoint(full, counts[-1], torch.Generator().manual_seed(0))
        print(f"generated {full} ({sum(f.stat().st_size for f in full.iterdir()) / 2**30:.1f} GiB) in {time.time() - t:.0f} s")
    tucker = Path(sys.executable).with_name("tuckerize")
    rows = []
    for n in counts:
        src = root / f"layers-{n}"
        subset(full, src, n)
        out = root / f"out-{n}"
        gib, secs = peak_rss_of([str(tucker), "decompose", "--model", str(src), "--ranks", args.ranks,
                                 "--out", str(out), "--overwrite", "--json"])
        manifest = json.loads((out / "tuckerize_manifest.json").read_text())
        rows.append({"layers": n, "peak_rss_gib": gib, "seconds": secs,
                     "source_gib": sum((src / f).stat().st_size for f in os.listdir(src)) / 2**30,
                     "experts_ratio": manifest["params"]["experts_ratio"]})
        print(json.dumps(rows[-1]))
    print("\n| MoE layers | source size (GiB) | peak RSS (GiB) | wall (s) |\n|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['layers']} | {r['source_gib']:.1f} | {r['peak_rss_gib']:.2f} | {r['seconds']:.0f} |")
    if not args.keep:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()

"""Expert imbalance under expert splitting (layouts ``expert`` and ``hybrid``).

With experts divided among ranks the slowest rank sets the pace. The demo models'
routers (the original checkpoints, native runtime, one process) run on their held-out
text; every MoE layer's routed pairs are counted per expert, and for N = 2, 4, 8 the
load of each rank (pairs routed to its experts) is compared with the mean:
``imbalance = max / mean - 1``, for the contiguous split the layouts use and, as the
alternative, a greedy assignment of experts to ranks by measured load (largest first
to the least loaded rank, equal expert counts not required).

    python bench/expert_load.py [--tokens 16384] [--seqlen 256]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def routing_counts(folder: Path, tokens: int, seqlen: int) -> dict[int, torch.Tensor]:
    """Pairs routed to each expert, per MoE layer, on the model's held-out text."""
    from tokenizers import Tokenizer

    from tuckerize.parallel import ParallelContext
    from tuckerize.runtime.loader import TensorSource
    from tuckerize.runtime.model import CausalLM

    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    ids = tok.encode((folder / "heldout.txt").read_text()).ids[:tokens]
    n = len(ids) // seqlen
    batch = torch.tensor(ids[: n * seqlen]).reshape(n, seqlen)
    source = TensorSource.open(folder, ParallelContext())
    model = CausalLM(source, dense_experts=True, dtype=torch.float32).eval()
    E = source.spec.num_experts
    counts = {i: torch.zeros(E, dtype=torch.long) for i in model.moe_blocks()}
    hooks = []
    for i, block in model.moe_blocks().items():
        def hook(mod, inp, out, i=i):
            counts[i] += torch.bincount(out[1].reshape(-1), minlength=E)
        hooks.append(block.gate.register_forward_hook(hook))
    with torch.no_grad():
        for b in range(0, n, 8):
            model(batch[b : b + 8])
    for h in hooks:
        h.remove()
    return counts


def contiguous_loads(counts: torch.Tensor, world: int) -> list[int]:
    from tuckerize.parallel import split_range

    return [int(counts[slice(*split_range(len(counts), world, r))].sum()) for r in range(world)]


def greedy_loads(counts: torch.Tensor, world: int) -> list[int]:
    loads = [0] * world
    for c in sorted(counts.tolist(), reverse=True):
        r = loads.index(min(loads))
        loads[r] += c
    return loads


def imbalance(loads: list[int]) -> float:
    mean = sum(loads) / len(loads)
    return max(loads) / mean - 1.0


def main() -> None:
    from tuckerize.demo import DEMO_DIR

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    result = {}
    print("| model | N | contiguous split: worst layer | mean over layers | greedy by load: worst layer |")
    print("|---|---:|---:|---:|---:|")
    for name, folder in (("demo (Qwen3-MoE)", DEMO_DIR), ("demo-mixtral", DEMO_DIR.parent / "mixtral")):
        counts = routing_counts(folder, args.tokens, args.seqlen)
        result[name] = {"counts": {i: c.tolist() for i, c in counts.items()}}
        for world in (2, 4, 8):
            cont = [imbalance(contiguous_loads(c, world)) for c in counts.values()]
            greedy = [imbalance(greedy_loads(c, world)) for c in counts.values()]
            result[name][world] = {"contiguous": cont, "greedy": greedy}
            print(f"| {name} | {world} | {max(cont):.1%} | {sum(cont) / len(cont):.1%} | {max(greedy):.1%} |")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

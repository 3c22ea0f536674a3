"""Stored quantised-base forms for tests: the stored tensors of one layer, an independent
float64 reference of its dense MoE, and a tp worker (spawned; must be importable)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

PREFIX = "model.layers.0.mlp.experts"
#: gate: base + residual; up: base alone; down: base (2 bits) + residual; one residual factor int4.
FORMS = {
    "gate": {"ranks": (4, 3, 3), "base": {"bits": 2, "group": 8}},
    "up": {"ranks": None, "base": {"bits": 3, "group": 8}},
    "down": {"ranks": (4, 4, 3), "base": {"bits": 2, "group": 8}},
}


def stored_layer(E: int = 4, H: int = 16, I: int = 24, forms=FORMS, seed: int = 0) -> dict[str, torch.Tensor]:
    """Every stored tensor of one layer in ``forms`` (bases packed, residual factors plain or int4)."""
    from tuckerize.decompose.factor_quant import stored_codes
    from tuckerize.decompose.gptq import rtn
    from tuckerize.quant_grid import Grid
    from tuckerize.quant import encode
    from tuckerize.quant_packed import encode as encode_packed

    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for p, f in forms.items():
        if f.get("base"):
            b = f["base"]
            shape = (E, H, I) if p == "down" else (E, I, H)  # [E, out, in]
            q = stored_codes(rtn(torch.randn(*shape, generator=g, dtype=torch.float64) * 0.3,
                                 Grid(bits=b["bits"], group=b["group"])), transposed=False)
            out.update(encode_packed(f"{PREFIX}.{p}.base", q.codes, q.scale, q.zero, b["bits"], b["group"]))
        if f.get("ranks"):
            rE, rH, rI = f["ranks"]
            factors = {"U_E": torch.linalg.qr(torch.randn(E, rE, generator=g))[0],
                       "U_H": torch.linalg.qr(torch.randn(H, rH, generator=g))[0],
                       "U_I": torch.linalg.qr(torch.randn(I, rI, generator=g))[0],
                       "core": torch.randn(rE, rH, rI, generator=g)}
            for k, v in factors.items():
                out.update(encode(f"{PREFIX}.{p}.{k}", v, "int4" if (p, k) == ("down", "U_I") else "float32", 8))
    return out


def reference_weights(stored, forms=FORMS) -> dict[str, torch.Tensor]:
    """``{p: [E, H, I]}`` float64: every stored tensor dequantised, base + residual summed."""
    from tuckerize.quant import decode

    W = {}
    for p, f in forms.items():
        w = 0
        if f.get("base"):
            b = decode(stored, f"{PREFIX}.{p}.base").double()
            w = b if p == "down" else b.transpose(1, 2)
        if f.get("ranks"):
            U = {k: decode(stored, f"{PREFIX}.{p}.{k}").double() for k in ("U_E", "U_H", "U_I", "core")}
            w = w + torch.einsum("ea,abc,hb,ic->ehi", U["U_E"], U["core"], U["U_H"], U["U_I"])
        W[p] = w
    return W


def reference_moe(W, x, index, weights) -> torch.Tensor:
    """The dense MoE in float64, token by token."""
    x = x.double()
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for k in range(index.shape[1]):
            e = int(index[t, k])
            a = torch.nn.functional.silu(x[t] @ W["gate"][e]) * (x[t] @ W["up"][e])
            out[t] += float(weights[t, k]) * (W["down"][e] @ a)
    return out


def routing(T: int, E: int, K: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    index = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    weights = torch.rand(T, K, generator=g)
    return index, weights / weights.sum(-1, keepdim=True)


def tp_worker(rank: int, world: int, init_method: str, out_dir: str, layout: str, experts) -> None:
    """Build the layer's experts on this rank of a gloo group from the full stored tensors and
    save its output (all-reduced) as ``out_dir/<layout>-r<rank>.pt``."""
    import torch.distributed as dist

    from dist_helpers import init_gloo
    from tuckerize.parallel import ParallelContext
    from tuckerize.runtime.base_experts import BaseResidualExperts

    init_gloo(rank, world, init_method)
    try:
        stored = stored_layer()
        mine = experts[rank] if experts is not None else None
        m = BaseResidualExperts(4, 16, 24, FORMS, layout=layout, parallel=ParallelContext.current(), experts=mine,
                                dtype=torch.float64)
        m.load_tensors(stored, PREFIX)
        x = torch.randn(9, 16, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
        index, weights = routing(9, 4, 2)
        y = m(x, index, weights)
        torch.save({"y": y, "inter": m.inter_range, "bytes": m.memory_bytes()}, Path(out_dir) / f"{layout}-r{rank}.pt")
        (Path(out_dir) / f"{layout}-r{rank}.json").write_text(json.dumps({"inter": list(m.inter_range)}))
        dist.barrier()
    finally:
        dist.destroy_process_group()

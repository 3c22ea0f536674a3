"""Independent references for runtime and shard tests.

Nothing here calls the runtime under test: dense expert weights are rebuilt from the
Tucker factors with one float64 einsum, and the reference MoE blocks are transformers'
own modules. Errors are relative Frobenius norms.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

#: Per-projection ranks below full for the tiny models (E >= 4, H = 32, I >= 16), all
#: different so that a factor read from the wrong projection or axis cannot go unnoticed.
PLAN_YAML = """\
ranks: [3, 12, 6]
projections:
  up: [4, 14, 7]
  down: [2, 10, 5]
"""
PLAN = {"gate": (3, 12, 6), "up": (4, 14, 7), "down": (2, 10, 5)}


def rel_err(ref: torch.Tensor, got: torch.Tensor) -> float:
    """||ref - got|| / ||ref||, computed in float64."""
    ref = torch.as_tensor(ref).double()
    got = torch.as_tensor(got).double()
    assert ref.shape == got.shape, (tuple(ref.shape), tuple(got.shape))
    return float(torch.linalg.norm(ref - got) / torch.linalg.norm(ref))


def decompose_tiny(src: Path, out: Path, **kwargs) -> Path:
    """Decompose ``src`` with :data:`PLAN_YAML` (ranks below full) into ``out``; ``kwargs``
    go to ``decompose_checkpoint`` (e.g. ``factor_dtype``)."""
    from tuckerize.compress import decompose_checkpoint

    plan = out.parent / f"{out.name}-plan.yaml"
    plan.write_text(PLAN_YAML)
    decompose_checkpoint(str(src), out, config=plan, **kwargs)
    return out


def expert_bytes_on_disk(folder: Path) -> int:
    """Bytes of the routed-expert tensors (names with ``.mlp.experts.``: dense weights, or
    factors with their codes, scales and shapes) in every safetensors file of ``folder``,
    read from the files' headers (their data offsets), not from any manifest."""
    import json
    import struct

    total = 0
    for f in sorted(Path(folder).glob("*.safetensors")):
        with f.open("rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        total += sum(v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items()
                     if k != "__metadata__" and ".mlp.experts." in k)
    return total


def dense_from_factors(U_E, U_H, U_I, core) -> torch.Tensor:
    """W[e, h, i] = sum core[a, b, c] U_E[e, a] U_H[h, b] U_I[i, c], float64."""
    return torch.einsum("abc,ea,hb,ic->ehi", core.double(), U_E.double(), U_H.double(), U_I.double())


def tucker_dense(tucker_dir: Path, layer: int) -> dict[str, torch.Tensor]:
    """Dense semantic [E, H, I] weights (float64) of every projection of ``layer``."""
    from tuckerize.format import TuckerCheckpoint

    ckpt = TuckerCheckpoint.open(tucker_dir)
    out = {}
    for p in ("gate", "up", "down"):
        f = ckpt.factors(layer, p)
        out[p] = dense_from_factors(f["U_E"], f["U_H"], f["U_I"], f["core"])
    return out


def load_hf(src: Path, dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(src), dtype=dtype).eval()


def install_dense(hf_experts: Any, dense: dict[str, torch.Tensor]) -> None:
    """Write semantic [E, H, I] weights into transformers' fused experts module:
    ``gate_up_proj [E, 2I, H]`` (gate rows first) and ``down_proj [E, H, I]``."""
    p = hf_experts.gate_up_proj
    gate_up = torch.cat([dense["gate"].transpose(1, 2), dense["up"].transpose(1, 2)], dim=1)
    assert tuple(gate_up.shape) == tuple(p.shape), (tuple(gate_up.shape), tuple(p.shape))
    assert tuple(dense["down"].shape) == tuple(hf_experts.down_proj.shape)
    with torch.no_grad():
        p.copy_(gate_up.to(p.dtype))
        hf_experts.down_proj.copy_(dense["down"].to(hf_experts.down_proj.dtype))


def random_orthonormal(n: int, r: int, generator: torch.Generator, dtype=torch.float64) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, r, generator=generator, dtype=torch.float64))
    return q.to(dtype)


def random_factors(E: int, H: int, I: int, ranks: dict[str, tuple[int, int, int]], seed: int = 0,
                   dtype=torch.float32) -> dict[str, torch.Tensor]:
    """``{"gate.U_E": ..., ...}``: random orthonormal factors and a random core per projection."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for p, (rE, rH, rI) in ranks.items():
        out[f"{p}.U_E"] = random_orthonormal(E, rE, g, dtype)
        out[f"{p}.U_H"] = random_orthonormal(H, rH, g, dtype)
        out[f"{p}.U_I"] = random_orthonormal(I, rI, g, dtype)
        out[f"{p}.core"] = torch.randn(rE, rH, rI, generator=g, dtype=torch.float64).to(dtype)
    return out


def dense_from_flat(factors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {p: dense_from_factors(*(factors[f"{p}.{f}"] for f in ("U_E", "U_H", "U_I", "core")))
            for p in ("gate", "up", "down")}


def moe_reference(x: torch.Tensor, top_i: torch.Tensor, top_w: torch.Tensor, dense: dict[str, torch.Tensor],
                  act=torch.nn.functional.silu) -> torch.Tensor:
    """Plain float64 loop over (token, slot): sum_k w * down[e] (act(x gate[e]) * (x up[e]))."""
    x = x.double()
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for k in range(top_i.shape[1]):
            e = int(top_i[t, k])
            a = act(x[t] @ dense["gate"][e]) * (x[t] @ dense["up"][e])
            out[t] += float(top_w[t, k]) * (dense["down"][e] @ a)
    return out

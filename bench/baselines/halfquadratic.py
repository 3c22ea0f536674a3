"""HQQ (half-quadratic quantisation, Badri & Shaji 2023; ``pip install hqq``) of a model's
routed experts, on CPU, in the baselines' virtual environment:

    /work/venvs/compare/bin/python bench/baselines/halfquadratic.py SRC OUT --bits 2 --group 64

HQQ is calibration-free: per group it fits the zero (and keeps the min-max scale) by a
half-quadratic proximal solver of an lp-norm (p = 0.7) of the weight error. Each expert matrix
``[out, in]`` goes through ``hqq.core.quantize.Quantizer.quantize`` with HQQ's own defaults for
weights (``hqq_base_quant_config``: axis 1, ``optimize=True``, zero rounded at 4 bits only,
bit-packed), then HQQ's ``dequantize`` with the scale and zero rounded to float16 first (HQQ
keeps its meta-data in the float16 compute dtype). OUT is the source checkpoint with the
dequantised experts (bench/compare.py scores it like every other row); ``hqq.json`` records
the bytes of the stored tensors HQQ produced (packed codes + float16 scale and zero), counted
from their shapes and dtypes.

The module is not named hqq.py: run as a script its folder comes first on ``sys.path``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def hqq_quantise(w: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, int]:
    """``(dequantised float32 [out, in], stored bytes)`` of one matrix."""
    from hqq.core.quantize import Quantizer

    w_q, meta = Quantizer.quantize(w.float(), nbits=bits, channel_wise=True, group_size=group, optimize=True,
                                   round_zero=bits == 4, axis=1, bitpack=True, device="cpu")
    scale, zero = meta["scale"].to(torch.float16), meta["zero"].to(torch.float16)
    nbytes = w_q.numel() * w_q.element_size() + (scale.numel() + zero.numel()) * 2
    meta = {**meta, "scale": scale.float(), "zero": zero.float(), "compute_dtype": torch.float32}
    return Quantizer.dequantize(w_q, meta).float().reshape(w.shape), nbytes


def main() -> None:
    ap = common.arg_parser(samples=0)
    ap.add_argument("--bits", type=int, default=2, choices=[2, 3, 4])
    args = ap.parse_args()
    from safetensors.torch import load_file

    from tuckerize.arch import moe_spec
    from tuckerize.checkpoint import load_config

    spec = moe_spec(load_config(args.src))
    tensors = load_file(str(args.src / "model.safetensors"))
    t = time.time()
    weights, nbytes = {}, 0
    for layer in spec.moe_layers:
        for e in range(spec.num_experts):
            for proj in ("gate", "up", "down"):
                w, b = hqq_quantise(tensors[spec.arch.expert_name(layer, proj, e)], args.bits, args.group)
                weights[(layer, e, proj)] = w
                nbytes += b
    info = {"bits": args.bits, "group": args.group, "axis": 1, "bytes": nbytes, "matrices": len(weights),
            "seconds": round(time.time() - t, 1)}
    common.write_dense(args.src, args.out, weights, "hqq", info)


if __name__ == "__main__":
    main()

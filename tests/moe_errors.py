"""Test and benchmark helper: the relative output error of every MoE block of Tucker
checkpoints against the original's, on the original model's own block inputs.

Used by tests/test_calibration*.py and bench/calibration.py (not part of the package:
``eval`` measures the same on the Tucker model's own stream).
"""

from __future__ import annotations

from pathlib import Path

import torch


@torch.no_grad()
def moe_output_errors(model_folder: str | Path, tucker_folders, tokens: torch.Tensor, *,
                      batch_size: int = 8) -> list[dict[int, float]]:
    """Relative error ``||block_T(x) - block(x)|| / ||block(x)||`` of every MoE block of each
    Tucker checkpoint in ``tucker_folders``, on the block inputs ``x`` that ``tokens``
    produce in the original model (one layer in memory at a time)."""
    from tuckerize.runtime.layerwise import CollectingExperts, LayerwiseRunner
    from tuckerize.runtime.loader import TensorSource, build_moe_block

    from tuckerize.parallel import ParallelContext

    source = TensorSource.open(model_folder, parallel=ParallelContext())
    spec = source.spec
    runner = LayerwiseRunner(source, tokens, batch_size=batch_size)
    tucker_sources = [TensorSource.open(f, parallel=ParallelContext()) for f in tucker_folders]
    num = [dict.fromkeys(spec.moe_layers, 0.0) for _ in tucker_sources]
    den = dict.fromkeys(spec.moe_layers, 0.0)
    act = source.config.get("hidden_act", "silu")
    for layer in range(spec.num_layers):
        hook = None
        if layer in spec.moe_layers:
            dense = build_moe_block(source, layer, experts=CollectingExperts(runner.stacked_experts(layer), act, None),
                                    dtype=torch.float32)
            blocks = [build_moe_block(ts, layer, dtype=torch.float32) for ts in tucker_sources]

            def hook(L: int, m: torch.Tensor) -> None:
                ref = dense(m).double()
                den[L] += float(ref.pow(2).sum())
                for j, block in enumerate(blocks):
                    num[j][L] += float((block(m).double() - ref).pow(2).sum())

        runner.run(layer, on_block_input=hook)
    return [{L: (n[L] / den[L]) ** 0.5 if den[L] > 0 else 0.0 for L in spec.moe_layers} for n in num]

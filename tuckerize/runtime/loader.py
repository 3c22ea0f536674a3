"""Where a rank's tensors come from, and building MoE blocks from them.

:class:`TensorSource` opens an original Hugging Face checkpoint, a Tucker checkpoint
or a shard set (in which case this rank reads only its own files). :meth:`TensorSource.load`
copies a tensor into a parameter or buffer, slicing a full tensor to this rank's part
with the same table the shard writer uses (:mod:`tuckerize.shard.plan`), or taking a
pre-sliced one as it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tuckerize.arch import FACTORS, PROJECTIONS, MoESpec, moe_spec
from tuckerize.checkpoint import Checkpoint, load_config
from tuckerize.errors import ShardError
from tuckerize.experts import stack_projection
from tuckerize.format import CONFIG_KEY, MANIFEST_NAME, factor_name
from tuckerize.runtime.moe import DenseExperts, MoEBlock
from tuckerize.runtime.parallel import ParallelContext
from tuckerize.runtime.routing import RouterSpec
from tuckerize.runtime.tucker_experts import TuckerExperts
from tuckerize.shard.plan import take, tensor_split
from tuckerize.shard.sharding import SHARD_MANIFEST, ShardSet


@dataclass
class TensorSource:
    folder: Path
    config: dict[str, Any]
    tensors: Checkpoint
    kind: str  # "original", "tucker" or "shard"
    parallel: ParallelContext
    layout: str = "intermediate"

    @classmethod
    def open(cls, folder: str | Path, parallel: ParallelContext | None = None, layout: str | None = None,
             verify: bool = True) -> "TensorSource":
        folder = Path(folder)
        parallel = parallel or ParallelContext.current()
        if (folder / SHARD_MANIFEST).is_file():
            shards = ShardSet.open(folder)
            if layout is not None and layout != shards.layout:
                raise ShardError(f"shard set {folder} uses layout {shards.layout}, not {layout}; reshard or drop --layout")
            rank_folder = shards.rank_folder(parallel.rank, parallel.world, verify=verify)
            return cls(folder, shards.config, Checkpoint.open(rank_folder), "shard", parallel, shards.layout)
        config = load_config(folder)
        kind = "tucker" if CONFIG_KEY in config and (folder / MANIFEST_NAME).is_file() else "original"
        return cls(folder, config, Checkpoint.open(folder), kind, parallel, layout or "intermediate")

    @property
    def spec(self) -> MoESpec:
        return moe_spec(self.config)

    @property
    def is_tucker(self) -> bool:
        return self.kind in ("tucker", "shard")

    def get(self, name: str) -> torch.Tensor:
        """``name`` as stored; FP8 weights dequantised with their scales (float32)."""
        return self.tensors.get(name, dequantize=True)

    def local(self, name: str) -> torch.Tensor:
        """This rank's part of ``name`` (sliced here if the file holds the whole tensor)."""
        t = self.get(name)
        if self.kind == "shard":
            return t
        sp = tensor_split(name, list(t.shape), self.config, self.parallel.world, self.parallel.rank, self.layout)
        return take(t, sp)

    def load(self, dst: torch.Tensor, name: str) -> None:
        t = self.local(name)
        if tuple(t.shape) != tuple(dst.shape):
            raise ShardError(f"{name} has shape {list(t.shape)} here, the model expects {list(dst.shape)}; "
                             "is the shard set from another model or tp size?")
        with torch.no_grad():
            dst.copy_(t)


def tucker_ranks(config: dict[str, Any], layer: int) -> dict[str, tuple[int, int, int]]:
    entry = config[CONFIG_KEY]["layers"][str(layer)]
    return {p: tuple(entry[p]["ranks"]) for p in PROJECTIONS}  # type: ignore[misc]


def build_experts(source: TensorSource, layer: int, dense: bool = False, dtype=None, device=None):
    """Tucker experts from a Tucker checkpoint or shard set; dense experts from an original one."""
    spec = source.spec
    E, H, I = spec.shape
    act = source.config.get("hidden_act", "silu")
    if dense or not source.is_tucker:
        if source.is_tucker:
            raise ShardError(f"{source.folder} is a Tucker checkpoint; dense experts need the original model")
        experts = DenseExperts(E, H, I, source.parallel, act=act, dtype=dtype, device=device)
        experts.load_stacked({p: stack_projection(source.tensors, spec, layer, p) for p in PROJECTIONS})
        return experts
    experts = TuckerExperts(E, H, I, tucker_ranks(source.config, layer), layout=source.layout,
                            parallel=source.parallel, act=act, dtype=dtype, device=device)
    prefix = spec.arch.experts_prefix(layer)
    experts.load_factors({f"{p}.{f}": source.get(factor_name(prefix, p, f)) for p in PROJECTIONS for f in FACTORS})
    return experts


def build_moe_block(source: TensorSource, layer: int, dense: bool = False, dtype=None, device=None,
                    experts: torch.nn.Module | None = None) -> MoEBlock:
    """Router, routed experts and shared expert of ``layer``. ``experts`` replaces the routed
    experts module (anything with ``partial(x, top_k_index, top_k_weights)`` and ``finish(s)``,
    e.g. the calibration's statistics collector); by default they are built from ``source``."""
    spec = source.spec
    arch = spec.arch
    router = RouterSpec.from_config(arch, source.config, spec.num_experts, spec.top_k)
    if experts is None:
        experts = build_experts(source, layer, dense=dense, dtype=dtype, device=device)
    block = MoEBlock(arch, source.config, router, experts, source.parallel, dtype=dtype, device=device)
    prefix = arch.moe_prefix.format(layer=layer)
    source.load(block.gate.weight, f"{prefix}.{arch.router}")
    if block.gate.e_score_correction_bias is not None:
        source.load(block.gate.e_score_correction_bias, f"{prefix}.gate.e_score_correction_bias")
    if block.shared_name:
        shared = getattr(block, block.shared_name)
        for proj in ("gate_proj", "up_proj", "down_proj"):
            source.load(getattr(shared, proj).weight, f"{prefix}.{block.shared_name}.{proj}.weight")
        if block.shared_gate is not None:
            source.load(block.shared_gate.weight, f"{prefix}.shared_expert_gate.weight")
    return block

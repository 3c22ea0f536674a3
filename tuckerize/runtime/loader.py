"""Where a rank's tensors come from, and building MoE blocks from them.

:class:`TensorSource` opens an original Hugging Face checkpoint, a Tucker checkpoint
or a shard set (in which case this rank reads only its own files).
:meth:`TensorSource.load_into` copies a tensor into a module's parameter or buffer,
slicing a full tensor to the part that the module says this rank holds
(``shard_spec``, beside the module's forward: :func:`split_of`), or taking a shard
file's slice as it is. :class:`SplitRecorder` runs the same building code on the meta
device and records those splits instead of loading: the shard writer's plan.
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
from tuckerize.integrity import verify_checkpoint
from tuckerize.parallel import ParallelContext, Split, take
from tuckerize.runtime.layout import layout_plan, with_assignment
from tuckerize.runtime.base_experts import BaseResidualExperts, has_base, projection_forms
from tuckerize.runtime.moe import DenseExperts, MoEBlock
from tuckerize.runtime.routing import RouterSpec
from tuckerize.runtime.tucker_experts import TuckerExperts
from tuckerize.shardset import SHARD_MANIFEST, ShardSet


def split_of(module: torch.nn.Module, name: str) -> Split | None:
    """The split of ``module``'s parameter or buffer ``name`` (dotted): the deepest module
    on the path that defines ``shard_spec`` answers for the rest of the name; None
    (replicated) if none does."""
    parts = name.split(".")
    for i in range(len(parts) - 1, -1, -1):
        owner = module.get_submodule(".".join(parts[:i])) if i else module
        spec = getattr(owner, "shard_spec", None)
        if spec is not None:
            return spec(".".join(parts[i:]))
    return None


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
        """``parallel``: this process's rank; by default one rank (runtime entry points pass
        ``ParallelContext.current()``). A shard set brings its layout; an unsharded Tucker
        checkpoint opened by several ranks takes ``layout``, by default the one ``tuckerize
        shard`` would choose, with experts assigned by the saved calibration load
        (:func:`tuckerize.runtime.layout.layout_plan`)."""
        folder = Path(folder)
        parallel = parallel or ParallelContext()
        if (folder / SHARD_MANIFEST).is_file():
            shards = ShardSet.open(folder)
            if layout is not None and layout != shards.layout:
                raise ShardError(f"shard set {folder} uses layout {shards.layout}, not {layout}; reshard or drop --layout")
            rank_folder = shards.rank_folder(parallel.rank, parallel.world, verify=verify)
            return cls(folder, shards.config, Checkpoint.open(rank_folder), "shard", parallel, shards.layout)
        config = load_config(folder)
        kind = "tucker" if CONFIG_KEY in config and (folder / MANIFEST_NAME).is_file() else "original"
        if kind == "tucker":
            verify_checkpoint(folder, verify=verify)
            if parallel.world > 1 and layout is None:  # as its shard set would be (tuckerize shard's rule)
                layout, _, assignment = layout_plan(config, parallel.world, None, folder)
                config = with_assignment(config, parallel.world, layout, assignment)
        return cls(folder, config, Checkpoint.open(folder), kind, parallel, layout or "intermediate")

    @property
    def spec(self) -> MoESpec:
        return moe_spec(self.config)

    @property
    def is_tucker(self) -> bool:
        return self.kind in ("tucker", "shard")

    def has(self, name: str) -> bool:
        return name in self.tensors

    def load_stacked(self, experts: DenseExperts, layer: int) -> None:
        """Dense routed experts of ``layer`` from an original checkpoint."""
        experts.load_stacked({p: stack_projection(self.tensors, self.spec, layer, p) for p in PROJECTIONS})

    def get(self, name: str) -> torch.Tensor:
        """``name`` as stored; FP8 weights dequantised with their scales (float32)."""
        return self.tensors.get(name, dequantize=True)

    def load(self, dst: torch.Tensor, name: str, split: Split | None = None) -> None:
        """Copy tensor ``name`` into ``dst``: this rank's ``split`` of a full tensor, or a
        shard file's slice as it is."""
        t = self.get(name)
        if self.kind != "shard":
            t = take(t, split)
        if tuple(t.shape) != tuple(dst.shape):
            raise ShardError(f"{name} has shape {list(t.shape)} here, the model expects {list(dst.shape)}; "
                             "is the shard set from another model or tp size?")
        with torch.no_grad():
            dst.copy_(t)

    def load_stored(self, module: torch.nn.Module, prefix: str) -> None:
        """Fill a module that reads stored tensors itself (a packed base stays packed:
        :class:`~tuckerize.runtime.base_experts.BaseResidualExperts`): every tensor it names
        (``module.stored_names(prefix)``), as stored, sliced by the module for this rank or,
        from a shard set, taken as the rank's file holds it."""
        from tuckerize.quant import is_quantised, read_stored

        stored: dict[str, torch.Tensor] = {}
        for name in module.stored_names(prefix).values():
            if is_quantised(self.tensors.weight_map, name):
                stored.update(read_stored(self.tensors, name))
            else:
                stored[name] = self.tensors.get(name)
        module.load_tensors(stored, prefix, sliced=self.kind == "shard")

    def load_into(self, module: torch.nn.Module, attr: str, name: str) -> None:
        """Fill ``module``'s parameter or buffer ``attr`` (dotted) from tensor ``name``,
        split as the module says (:func:`split_of`)."""
        self.load(module.get_parameter(attr) if _is_param(module, attr) else module.get_buffer(attr), name,
                  split_of(module, attr))


def _is_param(module: torch.nn.Module, attr: str) -> bool:
    owner, _, leaf = attr.rpartition(".")
    return leaf in (module.get_submodule(owner) if owner else module)._parameters


class SplitRecorder(TensorSource):
    """A source that loads nothing: building a model from it (on the meta device) records
    ``{tensor name: Split}`` for every tensor a layer splits on this rank."""

    def __init__(self, config: dict[str, Any], parallel: ParallelContext, layout: str, names=()):
        super().__init__(Path("."), config, None, "plan", parallel, layout)  # type: ignore[arg-type]
        self.names = set(names)
        self.splits: dict[str, Split] = {}

    @property
    def is_tucker(self) -> bool:
        return CONFIG_KEY in self.config

    def has(self, name: str) -> bool:
        return name in self.names

    def load(self, dst: torch.Tensor, name: str, split: Split | None = None) -> None:
        if split is not None:
            self.splits[name] = split

    def load_stacked(self, experts, layer: int) -> None:
        """Dense experts come from original checkpoints, which are never sharded."""

    def load_stored(self, module: torch.nn.Module, prefix: str) -> None:
        for attr, name in module.stored_names(prefix).items():
            split = module.shard_spec(attr)
            if split is not None:
                self.splits[name] = split


def tucker_ranks(config: dict[str, Any], layer: int) -> dict[str, tuple[int, int, int]]:
    entry = config[CONFIG_KEY]["layers"][str(layer)]
    return {p: tuple(entry[p]["ranks"]) for p in PROJECTIONS}  # type: ignore[misc]


def assigned_experts(source: TensorSource, layer: int) -> list[int] | None:
    """The experts this rank holds in ``layer`` when the shard set assigned them by measured
    load (``config["shard"]["experts"]``); None: the contiguous split."""
    per_rank = ((source.config.get("shard") or {}).get("experts") or {}).get(str(layer))
    if not per_rank or len(per_rank) != source.parallel.world:
        return None
    return list(per_rank[source.parallel.rank])


def build_experts(source: TensorSource, layer: int, dense: bool = False, dtype=None, device=None):
    """Tucker experts from a Tucker checkpoint or shard set (experts with a packed quantised
    base where the layer stores one, ``tuckerize decompose --bytes``); dense experts from an
    original one."""
    spec = source.spec
    E, H, I = spec.shape
    act = source.config.get("hidden_act", "silu")
    if dense or not source.is_tucker:
        if source.is_tucker:
            raise ShardError(f"{source.folder} is a Tucker checkpoint; dense experts need the original model")
        experts = DenseExperts(E, H, I, source.parallel, act=act, dtype=dtype, device=device)
        source.load_stacked(experts, layer)
        return experts
    entry = source.config[CONFIG_KEY]["layers"][str(layer)]
    if has_base(entry):  # a packed quantised base in some projection
        experts = BaseResidualExperts(E, H, I, projection_forms(entry), layout=source.layout,
                                      parallel=source.parallel, act=act, experts=assigned_experts(source, layer),
                                      dtype=dtype, device=device)
        source.load_stored(experts, spec.arch.experts_prefix(layer))
        return experts
    experts = TuckerExperts(E, H, I, tucker_ranks(source.config, layer), layout=source.layout,
                            parallel=source.parallel, act=act, experts=assigned_experts(source, layer),
                            dtype=dtype, device=device)
    prefix = spec.arch.experts_prefix(layer)
    for p in PROJECTIONS:
        for f in FACTORS:
            source.load_into(experts, f"{p}.{f}", factor_name(prefix, p, f))
    experts.materialize()
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
    source.load_into(block, "gate.weight", arch.router_name(layer))
    if block.gate.e_score_correction_bias is not None:
        source.load_into(block, "gate.e_score_correction_bias", arch.router_bias_name(layer))
    if block.shared_name:
        for name, _ in getattr(block, block.shared_name).named_parameters():
            attr = f"{block.shared_name}.{name}"
            source.load_into(block, attr, arch.moe_name(layer, attr))
        if block.shared_gate is not None:
            attr = f"{arch.shared_expert_gate}.weight"
            source.load_into(block, attr, arch.moe_name(layer, attr))
    return block

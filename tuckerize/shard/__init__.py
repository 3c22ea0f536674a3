"""Tensor-parallel sharding: the per-rank writer and the shard-set reader. How each
tensor is split is the runtime layers' own rule (tuckerize.runtime.plan)."""

from tuckerize.shard.plan import Split, check_tp, valid_tp
from tuckerize.shard.sharding import SHARD_MANIFEST, ShardSet, shard_checkpoint

__all__ = ["Split", "check_tp", "valid_tp", "SHARD_MANIFEST", "ShardSet", "shard_checkpoint"]

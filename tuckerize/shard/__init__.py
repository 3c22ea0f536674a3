"""Tensor-parallel sharding: the split table (plan) and the per-rank writer/reader."""

from tuckerize.shard.plan import Split, check_tp, tensor_split, valid_tp
from tuckerize.shard.sharding import SHARD_MANIFEST, ShardSet, shard_checkpoint

__all__ = ["Split", "check_tp", "tensor_split", "valid_tp", "SHARD_MANIFEST", "ShardSet", "shard_checkpoint"]

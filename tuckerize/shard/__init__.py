"""Tensor-parallel sharding: the per-rank writer (:func:`shard_checkpoint`). The shard-set
format and its reader are :mod:`tuckerize.shardset`; how each tensor is split is the
runtime layers' own rule (:func:`tuckerize.runtime.plan.rank_splits`)."""

from tuckerize.shard.sharding import shard_checkpoint

__all__ = ["shard_checkpoint"]

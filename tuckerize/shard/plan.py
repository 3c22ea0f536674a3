"""The checks of a tensor-parallel world size, for the shard writer and the runtime.

How each tensor is split is not written here: every runtime layer owns the split of
its own weights beside its forward (``shard_spec``), and the shard writer asks a model
skeleton built on the meta device (:func:`tuckerize.runtime.plan.rank_splits`). This
module re-exports the shared vocabulary of :mod:`tuckerize.parallel`.
"""

from tuckerize.parallel import Split, attention_dims, check_tp, take, valid_tp

__all__ = ["Split", "attention_dims", "check_tp", "take", "valid_tp"]

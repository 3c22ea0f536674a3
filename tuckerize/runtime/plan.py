"""Which slice of each full tensor a rank holds, asked of the runtime's own layers.

:func:`rank_splits` builds the model skeleton for one rank on the meta device (no
memory, no data) from a :class:`~tuckerize.runtime.loader.SplitRecorder`; every layer
that splits a weight answers through its ``shard_spec`` exactly as it does when it
loads, so the shard writer and the runtime cannot disagree. Architectures without a
native model (DeepSeek's MLA, Qwen3-Next) split only their Tucker factors, by
:class:`~tuckerize.runtime.tucker_experts.TuckerExperts`' own rule; every other tensor
of theirs is replicated.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

from tuckerize.arch import moe_spec
from tuckerize.parallel import ParallelContext, Split, check_layout, check_tp
from tuckerize.runtime.loader import SplitRecorder, build_experts
from tuckerize.runtime.model import CausalLM


def rank_splits(config: Mapping[str, Any], tp: int, rank: int, layout: str,
                names: Iterable[str] = ()) -> dict[str, Split]:
    """``{tensor name: Split}`` for rank ``rank`` of ``tp``; tensors not listed are
    replicated. ``names``: the checkpoint's tensor names (to tell a tied LM head)."""
    import torch

    check_layout(layout)
    check_tp(config, tp)
    if tp == 1:
        return {}
    recorder = SplitRecorder(dict(config), ParallelContext(rank=rank, world=tp), layout, names)
    spec = moe_spec(config)
    with torch.device("meta"):
        if spec.arch.native:
            CausalLM(recorder, dense_experts=not recorder.is_tucker, dtype=torch.float32, device="meta")
        else:
            for layer in spec.moe_layers:
                build_experts(recorder, layer, dtype=torch.float32, device="meta")
    return recorder.splits

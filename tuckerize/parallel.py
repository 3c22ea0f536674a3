"""The bottom layer of tensor parallelism: the vocabulary that ``shard`` and ``runtime`` share.

This module owns

* the tensor-parallel layouts of the Tucker experts (:data:`LAYOUTS`) and the expert
  activations (:data:`ACTIVATIONS`, resolved lazily by :func:`activation`);
* how a size is split over ranks (:func:`split_range`, :func:`split_sizes`) and how
  attention heads are (:func:`head_range`: the one place for the key/value-head
  replication rule; :func:`check_tp`, :func:`valid_tp`: the one heads rule);
* a slice of a full tensor (:class:`Split`, :func:`take`);
* the parallel context (:class:`ParallelContext`): rank, world size, process group and
  the collectives; :func:`agreed` and :func:`on_rank0` (a
  :class:`~tuckerize.errors.TuckerizeError` on any rank becomes the same error on every
  rank); :func:`init_from_env` (torchrun's environment -> process group and device, for
  the CLI entry points). ``ParallelContext()`` is rank 0 of 1; only runtime entry points
  (evaluation, model building under torchrun) call :meth:`ParallelContext.current`,
  everything else receives the context explicitly, so offline code never picks up a
  process group by accident.

It imports neither ``shard`` nor ``runtime`` and no ``torch.nn`` (torch is imported
lazily, inside the collectives).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence, TypeVar

from tuckerize.errors import ShardError

#: Tensor-parallel layouts of the Tucker experts (see tuckerize.runtime.tucker_experts).
LAYOUTS = ("intermediate", "expert", "hybrid", "hybrid-replicated-out")
#: Layouts that split the experts over ranks (and may assign them by measured load).
EXPERT_SPLIT_LAYOUTS = ("expert", "hybrid", "hybrid-replicated-out")
#: Layouts that split U_H of gate and up by columns (one all-gather of x U_H).
INPUT_SPLIT_LAYOUTS = ("hybrid", "hybrid-replicated-out")

#: ``hidden_act`` values the experts support.
ACTIVATIONS = ("silu", "swish", "gelu", "gelu_pytorch_tanh")


def activation(name: str) -> Callable:
    """The elementwise function for ``hidden_act`` ``name`` (torch.nn.functional)."""
    import torch.nn.functional as F

    if name not in ACTIVATIONS:
        raise ShardError(f"activation {name!r} is not supported; supported: {', '.join(ACTIVATIONS)}")
    if name == "gelu":
        return F.gelu
    if name == "gelu_pytorch_tanh":
        return lambda x: F.gelu(x, approximate="tanh")
    return F.silu


def check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ShardError(f"layout {layout!r} is not one of {', '.join(LAYOUTS)}")


# ----------------------------------------------------------------------------- splits


def split_range(n: int, world: int, rank: int) -> tuple[int, int]:
    """Contiguous ``[start, stop)`` of ``n`` items owned by ``rank``; the first ``n % world``
    ranks get one more item. Every item is owned by exactly one rank."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def split_sizes(n: int, world: int) -> list[int]:
    return [b - a for a, b in (split_range(n, world, r) for r in range(world))]


@dataclass(frozen=True)
class Split:
    """Rows or columns ``[start, stop)`` along ``axis`` of a full tensor, or, with
    ``index``, the listed rows in that order (experts assigned to ranks by load)."""

    axis: int
    start: int
    stop: int
    index: tuple[int, ...] | None = None


def take(tensor, split: Split | None):
    """The slice of a full tensor that a split names (the tensor itself if replicated)."""
    if split is None:
        return tensor
    if split.index is not None:
        import torch

        return tensor.index_select(split.axis, torch.tensor(split.index, dtype=torch.long, device=tensor.device))
    return tensor.narrow(split.axis, split.start, split.stop - split.start)


def imbalance(loads: list[float]) -> float:
    """How much the busiest rank exceeds the mean: ``max / mean - 1`` (0 when even)."""
    mean = sum(loads) / len(loads)
    return max(loads) / mean - 1.0 if mean > 0 else 0.0


def contiguous_assignment(num_experts: int, world: int) -> list[list[int]]:
    """Experts of each rank under the contiguous split (:func:`split_range`)."""
    return [list(range(*split_range(num_experts, world, r))) for r in range(world)]


def balanced_assignment(counts: list[float], world: int) -> list[list[int]]:
    """Experts of each rank assigned by measured load: heaviest expert first, to the rank
    with the least load so far (ties: fewer experts, then lower rank); sorted per rank."""
    loads = [0.0] * world
    ranks: list[list[int]] = [[] for _ in range(world)]
    for e in sorted(range(len(counts)), key=lambda e: (-counts[e], e)):
        r = min(range(world), key=lambda r: (loads[r], len(ranks[r]), r))
        loads[r] += counts[e]
        ranks[r].append(e)
    return [sorted(x) for x in ranks]


def assign_experts(load: Mapping[int, Sequence[float]], tp: int, above: float = 0.2) -> dict[int, dict[str, Any]]:
    """Per layer with a measured load (``{layer: routed tokens per expert}``): the
    contiguous split's imbalance and, where it is above ``above``, the assignment by load
    (:func:`balanced_assignment`) if that is more even. ``{layer: {"ranks": experts per
    rank, "assigned": bool, "imbalance_contiguous": x, "imbalance": y}}``; the shard
    writer and the vLLM plugin both use it, so a shard set and a served model agree."""
    out = {}
    for layer, counts in sorted(load.items()):
        counts = [float(c) for c in counts]
        contiguous = contiguous_assignment(len(counts), tp)
        before = imbalance([sum(counts[e] for e in ids) for ids in contiguous])
        ranks, after, assigned = contiguous, before, False
        if before > above:
            ranks = balanced_assignment(counts, tp)
            after = imbalance([sum(counts[e] for e in ids) for ids in ranks])
            assigned = after < before
            ranks = ranks if assigned else contiguous
            after = after if assigned else before
        out[int(layer)] = {"ranks": ranks, "assigned": assigned, "imbalance_contiguous": round(before, 4),
                           "imbalance": round(after, 4)}
    return out


# ----------------------------------------------------------------------------- attention heads


def attention_dims(config: Mapping[str, Any]) -> tuple[int, int, int]:
    """``(query heads, key/value heads, head_dim)`` from a config."""
    heads = int(config["num_attention_heads"])
    kv = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or config["hidden_size"] // heads)
    return heads, kv, head_dim


def head_range(num_heads: int, world: int, rank: int, replicate: bool = False) -> tuple[int, int]:
    """Heads ``[start, stop)`` that ``rank`` holds. Heads divide over ranks; with
    ``replicate`` (key/value heads) fewer heads than ranks are replicated instead, each
    rank keeping the one head its query heads use (as vLLM does)."""
    if num_heads % world == 0:
        per = num_heads // world
        return rank * per, (rank + 1) * per
    if replicate and world % num_heads == 0:
        h = rank // (world // num_heads)
        return h, h + 1
    raise ShardError(f"{num_heads} heads cannot be split over {world} ranks")


def _tp_ok(heads: int, kv: int, tp: int) -> bool:
    try:
        head_range(heads, tp, 0)
        head_range(kv, tp, 0, replicate=True)
    except ShardError:
        return False
    return True


def valid_tp(config: Mapping[str, Any], limit: int = 64) -> list[int]:
    heads, kv, _ = attention_dims(config)
    return [t for t in range(1, limit + 1) if _tp_ok(heads, kv, t)]


def check_tp(config: Mapping[str, Any], tp: int) -> None:
    if tp < 1:
        raise ShardError(f"--tp {tp} must be at least 1")
    heads, kv, _ = attention_dims(config)
    if not _tp_ok(heads, kv, tp):
        ok = ", ".join(map(str, valid_tp(config, max(tp, heads))))
        raise ShardError(
            f"--tp {tp} does not divide the {heads} attention heads ({kv} key/value heads); use one of: {ok}"
        )


# ----------------------------------------------------------------------------- context


@dataclass(frozen=True)
class ParallelContext:
    """Rank and world size, taken once. ``ParallelContext()`` is one rank (rank 0 of 1);
    collectives are no-ops at world size 1."""

    rank: int = 0
    world: int = 1
    group: Any = None

    @classmethod
    def current(cls, group: Any = None) -> "ParallelContext":
        """The initialised process group's rank and size, or one rank. Call it only at a
        runtime entry point and pass the result on."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return cls(rank=dist.get_rank(group), world=dist.get_world_size(group), group=group)
        return cls()

    def all_reduce(self, tensor):
        """The sum over ranks of ``tensor``; use the returned tensor (a serving engine's
        collective may return a new one; torch.distributed's sums in place)."""
        return self._all_reduce(tensor) if self.world > 1 else tensor

    def all_gather_cat(self, tensor, sizes: list[int], dim: int = -1):
        """Concatenate each rank's ``tensor`` along ``dim``; rank r contributes ``sizes[r]``
        entries (uneven splits are padded to the largest for the collective)."""
        if self.world == 1:
            return tensor
        import torch

        dim = dim % tensor.ndim
        width = max(sizes)
        if tensor.shape[dim] < width:
            pad_shape = list(tensor.shape)
            pad_shape[dim] = width - tensor.shape[dim]
            tensor = torch.cat([tensor, tensor.new_zeros(pad_shape)], dim=dim)
        parts = self._all_gather(tensor.contiguous(), dim).split(width, dim=dim)
        return torch.cat([p.narrow(dim, 0, n) for p, n in zip(parts, sizes)], dim=dim)

    # The two primitives; a serving engine's context overrides them with its own
    # communicator (tuckerize.integrations.vllm.moe.VllmParallel).
    def _all_reduce(self, tensor):
        import torch.distributed as dist

        dist.all_reduce(tensor, group=self.group)
        return tensor

    def _all_gather(self, tensor, dim: int):
        """Equal-sized ``tensor`` of every rank, concatenated along ``dim`` in rank order."""
        import torch
        import torch.distributed as dist

        parts = [torch.empty_like(tensor) for _ in range(self.world)]
        dist.all_gather(parts, tensor, group=self.group)
        return torch.cat(parts, dim=dim)


T = TypeVar("T")


def _raise_agreed(parallel: ParallelContext, outcomes: list[Any]) -> None:
    """Raise the first failure of ``outcomes`` (rank -> None or (exception type name, message))."""
    for rank, outcome in enumerate(outcomes):
        if outcome is not None:
            import tuckerize.errors as errors

            kind = getattr(errors, outcome[0], errors.TuckerizeError)
            prefix = "" if rank == parallel.rank or outcome[1].startswith("rank ") else f"rank {rank}: "
            raise kind(prefix + outcome[1])


def agreed(parallel: ParallelContext, fn: Callable[[], T]) -> T:
    """``fn()`` on every rank, then one collective so that all ranks agree on the outcome: if
    any rank raised a :class:`~tuckerize.errors.TuckerizeError`, every rank raises it (the
    first failing rank's message, prefixed with its rank), instead of the others running into
    a collective that the failed rank left and dying with gloo/NCCL tracebacks."""
    from tuckerize.errors import TuckerizeError

    result: Any = None
    failure: tuple[str, str] | None = None
    try:
        result = fn()
    except TuckerizeError as exc:
        if parallel.world <= 1:
            raise
        failure = (type(exc).__name__, str(exc))
    if parallel.world > 1:
        import torch.distributed as dist

        outcomes: list[Any] = [None] * parallel.world
        dist.all_gather_object(outcomes, failure, group=parallel.group)
        _raise_agreed(parallel, outcomes)
    return result


def on_rank0(parallel: ParallelContext, fn: Callable[[], T]) -> T:
    """``fn()`` on rank 0 only; its result (picklable) is sent to every rank, and its
    :class:`~tuckerize.errors.TuckerizeError` raised on every rank. A collective: every
    rank calls it at the same point."""
    if parallel.world <= 1:
        return fn()
    import torch.distributed as dist

    from tuckerize.errors import TuckerizeError

    box: list[Any] = [None]
    if parallel.rank == 0:
        try:
            box[0] = (None, fn())
        except TuckerizeError as exc:
            box[0] = ((type(exc).__name__, str(exc)), None)
    dist.broadcast_object_list(box, src=0, group=parallel.group)
    failure, result = box[0]
    _raise_agreed(parallel, [failure])
    return result


def init_from_env(device: str, flag: str = "--device") -> tuple[ParallelContext, Any]:
    """torchrun's environment -> (context, device): with ``WORLD_SIZE`` > 1 the default
    process group is initialised (gloo for the CPU, nccl/hccl for cuda/npu) and ``cuda``/``npu``
    without an index means the local rank's device. Only CLI entry points call this."""
    import os

    from tuckerize.devices import collective_backend, resolve_device

    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank if world > 1 else None, flag=flag)
    if world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            # torch._dynamo (torch 2.13), when first imported after the group exists (transformers'
            # AutoTokenizer imports it), keeps ten references to the group where no Python object
            # shows them: destroy_process_group then frees nothing, gloo's threads outlive it and
            # the interpreter's teardown races them ("terminate called without an active
            # exception", SIGABRT after a good run). Imported first, it holds none.
            import torch._dynamo  # noqa: F401

            if dev.type == "cuda":
                import torch

                torch.cuda.set_device(dev)
            dist.init_process_group(collective_backend(dev))
    return ParallelContext.current(), dev


def leave_process_group(done: bool) -> None:
    """Leave torchrun's process group before the process exits (after a barrier when every
    rank finished), so that the group and its threads are freed before the interpreter's
    teardown (a gloo group left to it made ranks abort at exit). The counterpart of
    :func:`init_from_env`; only CLI entry points call it."""
    import sys

    if "torch.distributed" not in sys.modules:
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if done:
            dist.barrier()
        dist.destroy_process_group()

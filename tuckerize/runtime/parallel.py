"""Tensor-parallel context: rank and world size, taken once.

Building a module without an initialised process group means one rank (rank 0 of
1), so every layer can be built and tested in a single process. Collectives are
no-ops at world size 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ParallelContext:
    rank: int = 0
    world: int = 1
    group: Any = None

    @classmethod
    def current(cls, group: Any = None) -> "ParallelContext":
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return cls(rank=dist.get_rank(group), world=dist.get_world_size(group), group=group)
        return cls()

    def all_reduce(self, tensor):
        if self.world > 1:
            import torch.distributed as dist

            dist.all_reduce(tensor, group=self.group)
        return tensor

    def all_gather_cat(self, tensor, sizes: list[int], dim: int = -1):
        """Concatenate each rank's ``tensor`` along ``dim``; rank r contributes ``sizes[r]``
        entries (uneven splits are padded to the largest for the collective)."""
        if self.world == 1:
            return tensor
        import torch
        import torch.distributed as dist

        dim = dim % tensor.ndim
        width = max(sizes)
        if tensor.shape[dim] < width:
            pad_shape = list(tensor.shape)
            pad_shape[dim] = width - tensor.shape[dim]
            tensor = torch.cat([tensor, tensor.new_zeros(pad_shape)], dim=dim)
        parts = [torch.empty_like(tensor) for _ in range(self.world)]
        dist.all_gather(parts, tensor.contiguous(), group=self.group)
        return torch.cat([p.narrow(dim, 0, n) for p, n in zip(parts, sizes)], dim=dim)


def split_range(n: int, world: int, rank: int) -> tuple[int, int]:
    """Contiguous ``[start, stop)`` of ``n`` items owned by ``rank``; the first ``n % world``
    ranks get one more item. Every item is owned by exactly one rank."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def split_sizes(n: int, world: int) -> list[int]:
    return [b - a for a, b in (split_range(n, world, r) for r in range(world))]

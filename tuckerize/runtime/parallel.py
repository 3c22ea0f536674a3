"""Import path kept for existing callers: the parallel context now lives in the bottom
layer, :mod:`tuckerize.parallel`."""

from tuckerize.parallel import ParallelContext, split_range, split_sizes

__all__ = ["ParallelContext", "split_range", "split_sizes"]

"""Tensor mathematics only: no files, no formats, no architectures."""

from tuckerize.decompose.tucker import (
    TuckerTensor,
    cheapest_mode_order,
    hooi_sweep,
    hosvd,
    mode_dot,
    sthosvd_flops,
    tucker,
)
from tuckerize.decompose.whiten import Whitening, mode_spectra, whitened_tucker, whitening

__all__ = ["TuckerTensor", "tucker", "hosvd", "hooi_sweep", "mode_dot", "cheapest_mode_order", "sthosvd_flops",
           "Whitening", "whitening", "whitened_tucker", "mode_spectra"]

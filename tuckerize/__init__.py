"""tuckerize: Tucker compression of Mixture-of-Experts checkpoints.

The library never prints; long operations report through a ``progress``
callback (see :mod:`tuckerize.progress`). Heavy imports (torch) happen inside
the functions that need them so that ``tuckerize --help`` stays instant.
"""

from tuckerize.errors import (
    BackendError,
    CalibrationError,
    InputError,
    OutputConflictError,
    OutputError,
    RankError,
    ShardError,
    TuckerizeError,
    UnsupportedArchitectureError,
)
from tuckerize.version import __version__

__all__ = [
    "__version__",
    "TuckerizeError",
    "InputError",
    "RankError",
    "UnsupportedArchitectureError",
    "OutputConflictError",
    "OutputError",
    "ShardError",
    "BackendError",
    "CalibrationError",
    "decompose_checkpoint",
]


def __getattr__(name: str):
    """``tuckerize.decompose_checkpoint`` without importing the pipeline at ``import tuckerize``."""
    if name == "decompose_checkpoint":
        from tuckerize.compress import decompose_checkpoint

        return decompose_checkpoint
    raise AttributeError(f"module 'tuckerize' has no attribute {name!r}")

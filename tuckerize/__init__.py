"""tuckerize: Tucker compression of Mixture-of-Experts checkpoints.

The library never prints; long operations report through a ``progress``
callback (see :mod:`tuckerize.progress`). Heavy imports (torch) happen inside
the functions that need them so that ``tuckerize --help`` stays instant.
"""

__version__ = "0.1.0"

from tuckerize.errors import (  # noqa: E402
    InputError,
    OutputConflictError,
    RankError,
    ShardError,
    TuckerizeError,
    UnsupportedArchitectureError,
)

__all__ = [
    "__version__",
    "TuckerizeError",
    "InputError",
    "RankError",
    "UnsupportedArchitectureError",
    "OutputConflictError",
    "ShardError",
]

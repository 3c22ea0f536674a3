"""The project's own exceptions.

Every error a user can cause (a missing folder, a rank out of range, an
unsupported architecture...) is a :class:`TuckerizeError` whose message is one
line that names the problem and says what to do. The CLI prints that line and
exits with code 1; ``TUCKERIZE_DEBUG=1`` shows the traceback.
"""

from __future__ import annotations


class TuckerizeError(Exception):
    """Base class: a problem the user can fix, described in one line."""


class InputError(TuckerizeError):
    """A model folder, hub id, file or tensor cannot be used as given."""


class RankError(TuckerizeError):
    """Ranks are malformed or out of range for the tensor they apply to."""


class UnsupportedArchitectureError(TuckerizeError):
    """The checkpoint's architecture is not in the table of supported ones."""


class OutputConflictError(TuckerizeError):
    """The output folder exists and holds something this run must not overwrite."""


class OutputError(TuckerizeError):
    """An output path cannot be written: disk full, read-only, below a file, no permission."""


class ShardError(TuckerizeError):
    """A shard set is inconsistent with the request (world size, files, checksums)."""


class BackendError(TuckerizeError):
    """A device or collective backend is unavailable."""


class CalibrationError(TuckerizeError):
    """Calibration text, settings or saved statistics cannot be used as given."""


class IntegrityError(TuckerizeError):
    """A file does not match the size or sha256 its manifest records (damaged or replaced)."""

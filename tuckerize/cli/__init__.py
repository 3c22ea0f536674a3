"""The ``tuckerize`` command: one module per command, each a thin call into the library.

Nothing heavy is imported at module level, so ``tuckerize --help`` does not import torch.
"""

from __future__ import annotations

import os
import sys
from typing import Callable, TypeVar

import typer

from tuckerize.version import __version__
from tuckerize.errors import TuckerizeError

app = typer.Typer(
    name="tuckerize",
    help="Tucker compression of Mixture-of-Experts checkpoints: decompose, shard, eval, serve.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

T = TypeVar("T")


def run_or_exit(fn: Callable[[], T], interrupted: str = "interrupted; rerun the same command to resume") -> T:
    """Run a library call; turn a known error into one line on stderr and exit code 1.

    ``TUCKERIZE_DEBUG=1`` re-raises it with the traceback. An ``OSError`` a user can fix
    (disk full, read-only or unwritable path, a path below a file) that no library writer
    mapped is one line too (:func:`tuckerize.checkpoint.output_error`). ``interrupted`` is the
    line printed on Ctrl-C (exit code 130): say what a rerun does for this command.
    """
    try:
        return fn()
    except TuckerizeError as exc:
        if os.environ.get("TUCKERIZE_DEBUG"):
            raise
        print(f"error: {exc}", file=sys.stderr)
        raise typer.Exit(1) from None
    except OSError as exc:
        from tuckerize.checkpoint import output_error

        mapped = output_error(exc)
        if mapped is None or os.environ.get("TUCKERIZE_DEBUG"):
            raise
        print(f"error: {mapped}", file=sys.stderr)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        raise typer.Exit(130) from None


def _version(value: bool) -> None:
    if value:
        print(f"tuckerize {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """Tucker compression of Mixture-of-Experts checkpoints."""


from tuckerize.cli import decompose as _decompose  # noqa: E402,F401
from tuckerize.cli import shard as _shard  # noqa: E402,F401
from tuckerize.cli import eval as _eval  # noqa: E402,F401
from tuckerize.cli import serve as _serve  # noqa: E402,F401

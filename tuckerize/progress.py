"""Progress reporting without printing.

Library functions take ``progress: Progress | None``. A :class:`Progress` receives
``start(task, total)``, ``advance(task, n=1, **info)`` and ``finish(task)``; the CLI
implements it with a rich progress bar, tests with a list.
"""

from __future__ import annotations

from typing import Any, Protocol


class Progress(Protocol):
    def start(self, task: str, total: int) -> None: ...

    def advance(self, task: str, n: int = 1, **info: Any) -> None: ...

    def finish(self, task: str) -> None: ...


class NullProgress:
    def start(self, task: str, total: int) -> None:
        pass

    def advance(self, task: str, n: int = 1, **info: Any) -> None:
        pass

    def finish(self, task: str) -> None:
        pass


def ensure(progress: Progress | None) -> Progress:
    return NullProgress() if progress is None else progress

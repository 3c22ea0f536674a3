"""Task accuracy: the project's own multiple-choice JSONL scorer and lm-eval-harness tasks.

:func:`score_jsonl` scores a local JSONL file of multiple-choice items on any
:class:`~tuckerize.evaluate.runtimes.EvalModel` (every runtime, under torchrun too) and follows
lm-eval-harness's conventions exactly (``lm-eval==0.4.13``, the version the ``eval`` extra
installs; read from its ``api/model.py``, ``api/task.py``, ``models/huggingface.py``), so that
the same items give the same accuracy through ``--tasks-jsonl`` and ``--tasks``:

* each choice is scored as the continuation ``target_delimiter + choice`` of the context
  (lm-eval's ``target_delimiter``, default ``" "``; a line may set its own);
* the pair is encoded the way ``TemplateLM._encode_pair`` does: whitespace at the end of the
  context moves to the start of the continuation, ``context + continuation`` is encoded whole
  and the continuation is what follows the context's own encoding; strings are encoded with
  the tokenizer's default special tokens unless they already start with the prefix token's
  text (``HFLM.tok_encode``); an empty context is the prefix token (BOS, else EOS); a
  context of whitespace only is refused (lm-eval fails on it);
* the log-likelihood is the sum of the continuation tokens' log-probabilities after
  ``(context + continuation)[-(max_length + 1):][:-1]`` (left truncation to the model's
  ``max_length``: ``n_positions``, ``max_position_embeddings`` or ``n_ctx`` of its config,
  else the tokenizer's ``model_max_length``, else 2048);
* ``acc``: the choice of highest log-likelihood; ``acc_norm``: of highest log-likelihood per
  character of the choice (``len(choice)``, the delimiter not counted); ties go to the first.

The one difference left: lm-eval's log-softmax runs in the model's dtype, ours in float32
(identical for float32 models).

:func:`score_lm_eval` runs lm-eval tasks on the transformers path (one process). A task is
named as lm-eval names it (``arc_easy``) or by a local task YAML or a folder of them: each
is read with lm-eval's own YAML loader (``include:``, ``!function``) and its relative
``dataset_kwargs.data_files`` / ``dataset_path`` are taken relative to the YAML's folder,
so a task and its data can be shipped side by side and run from any folder, offline.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import torch

from tuckerize.errors import InputError
from tuckerize.evaluate.runtimes import EvalModel

#: lm-eval's default ``target_delimiter`` (``TaskConfig.target_delimiter``).
TARGET_DELIMITER = " "
#: lm-eval's ``DEFAULT_MAX_LENGTH`` and ``TOKENIZER_INFINITY`` (models/utils.py).
DEFAULT_MAX_LENGTH = 2048
_TOKENIZER_INFINITY = 1000000000000000019884624838656
_LM_EVAL_FIX = "pip install -e '.[eval]' (lm-eval-harness)"


# -- the JSONL scorer -------------------------------------------------------------------------
def max_length(config: Mapping[str, Any], tokenizer) -> int:
    """The context length lm-eval's HFLM uses for a model (``resolve_max_length``)."""
    cfg = config.get("text_config") or config
    for key in ("n_positions", "max_position_embeddings", "n_ctx"):
        if cfg.get(key) is not None:
            return int(cfg[key])
    limit = getattr(tokenizer, "model_max_length", None)
    return int(limit) if limit is not None and limit != _TOKENIZER_INFINITY else DEFAULT_MAX_LENGTH


def _prefix_token_id(tokenizer) -> int:
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def _tok_encode(tokenizer, text: str, add_special_tokens: bool | None = None) -> list[int]:
    kwargs = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
    if add_special_tokens is None and text.startswith(tokenizer.decode(_prefix_token_id(tokenizer))):
        kwargs["add_special_tokens"] = False
    return tokenizer.encode(text, **kwargs)


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """``(context ids, continuation ids)`` as lm-eval's ``loglikelihood`` encodes a request."""
    if context == "":
        cont = _tok_encode(tokenizer, continuation, add_special_tokens=False)
        prefix = _prefix_token_id(tokenizer)
        return ([prefix], cont) if prefix != cont[0] else (cont[:1], cont[1:])
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = _tok_encode(tokenizer, context + continuation)
    ctx = _tok_encode(tokenizer, context)
    return ctx, whole[len(ctx):]


@torch.no_grad()
def loglikelihood(model: EvalModel, ctx: list[int], cont: list[int], device, limit: int) -> float:
    """Summed log-probability of ``cont`` after ``ctx``, the input left-truncated to ``limit``
    tokens as lm-eval truncates it. The whole sequence is sent and its last row dropped (the
    same predictions: every runtime's forward gives row t for the token after t, and the vLLM
    runtime has no row beyond its prompt)."""
    if not cont:
        return 0.0
    ids = torch.tensor([(ctx + cont)[-(limit + 1):]], device=device)
    logp = torch.log_softmax(model.forward(ids)[0, :-1].float(), -1)[-len(cont):]
    target = torch.tensor(cont, device=device)
    return float(logp.gather(-1, target[:, None]).sum())


def _rows(path: Path, limit: int | None) -> list[tuple[str, list[str], int, str]]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if limit:
        rows = rows[:limit]
    if not rows:
        raise InputError(f"task file {path} has no examples")
    out = []
    for n, row in enumerate(rows, 1):
        try:
            choices = [str(c) for c in row["choices"]]
            out.append((str(row["context"]), choices, int(row["label"]),
                        str(row.get("target_delimiter", TARGET_DELIMITER))))
        except (KeyError, TypeError, ValueError):
            raise InputError(f"{path}: each line needs context, choices and label") from None
        if out[-1][0] and not out[-1][0].strip():
            raise InputError(f"{path}: example {n} has a context of whitespace only, which lm-eval cannot score; "
                             "leave it empty or give it text")
    return out


def score_jsonl(model: EvalModel, tokenizer, path: Path, device, limit: int | None = None,
                context_length: int = DEFAULT_MAX_LENGTH) -> dict[str, float]:
    """Multiple-choice accuracy on a JSONL file with lines ``{"context": str, "choices": [str,
    ...], "label": int}`` (optionally ``"target_delimiter": str``), scored as lm-eval scores a
    ``multiple_choice`` task (module docstring); ``context_length``: :func:`max_length`."""
    rows = _rows(path, limit)
    acc = acc_norm = 0
    for context, choices, label, delimiter in rows:
        lls = np.array([loglikelihood(model, *encode_pair(tokenizer, context, delimiter + c), device, context_length)
                        for c in choices])
        with np.errstate(divide="ignore", invalid="ignore"):
            norm = lls / np.array([float(len(c)) for c in choices])
        acc += int(np.argmax(lls) == label)
        acc_norm += int(np.argmax(norm) == label)
    return {"acc": acc / len(rows), "acc_norm": acc_norm / len(rows), "examples": len(rows)}


# -- lm-eval ----------------------------------------------------------------------------------
def _relative_to(base: Path, value):
    """``value`` (a path, or a list / dict of them) with relative paths taken from ``base``."""
    if isinstance(value, str):
        return value if Path(value).is_absolute() or "://" in value else str(base / value)
    if isinstance(value, list):
        return [_relative_to(base, v) for v in value]
    if isinstance(value, dict):
        return {k: _relative_to(base, v) for k, v in value.items()}
    return value


def _local_task(path: Path) -> dict[str, Any] | None:
    from lm_eval.tasks._yaml_loader import load_yaml

    try:
        cfg = load_yaml(path)
    except Exception as exc:  # noqa: BLE001 - yaml errors, a missing !function module
        raise InputError(f"--tasks {path} cannot be read as an lm-eval task ({type(exc).__name__}: {exc})") from None
    if "task" not in cfg:
        return None
    data = dict(cfg.get("dataset_kwargs") or {})
    if "data_files" in data:
        data["data_files"] = _relative_to(path.parent, data["data_files"])
        cfg["dataset_kwargs"] = data
    local = cfg.get("dataset_path") and (path.parent / cfg["dataset_path"]).exists()
    if local and not Path(cfg["dataset_path"]).is_absolute():
        cfg["dataset_path"] = str(path.parent / cfg["dataset_path"])
    return cfg


def resolve_tasks(tasks: list[str]) -> list[str | dict[str, Any]]:
    """lm-eval task specs for ``--tasks``: names as they are; a ``.yaml`` file, or a folder of
    them, as task configs with their data paths taken relative to the file (module docstring).
    Checked before any model is loaded."""
    specs: list[str | dict[str, Any]] = []
    for entry in tasks:
        path = Path(entry)
        if path.suffix not in (".yaml", ".yml") and not path.is_dir():
            specs.append(entry)
            continue
        try:
            import lm_eval  # noqa: F401
        except ImportError:
            raise InputError(f"--tasks needs lm-eval-harness: {_LM_EVAL_FIX}") from None
        if not path.exists():
            raise InputError(f"--tasks {entry}: no such task file or folder")
        files = [path] if path.is_file() else sorted([*path.glob("*.yaml"), *path.glob("*.yml")])
        found = [cfg for cfg in map(_local_task, files) if cfg is not None]
        if not found:
            raise InputError(f"--tasks {entry}: no lm-eval task (a YAML with a 'task:' key) found there")
        specs.extend(found)
    return specs


@contextlib.contextmanager
def _quiet_lm_eval() -> Iterator[None]:
    """lm-eval's INFO and WARNING lines off while it runs (errors still show)."""
    log = logging.getLogger("lm_eval")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def score_lm_eval(model_path: str, tokenizer, tasks: list[str | dict[str, Any]], dtype, device,
                  limit: int | None) -> dict[str, Any]:
    """lm-eval-harness tasks (:func:`resolve_tasks`) on the transformers path (single process),
    the model wrapped as built. ``{task: {metric: value}}`` with lm-eval's metric keys
    (``acc,none``, ``acc_norm,none``, their ``_stderr``)."""
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise InputError(f"--tasks needs lm-eval-harness: {_LM_EVAL_FIX}") from None
    from tuckerize.runtime.hf import load_hf_model

    model = load_hf_model(model_path, dtype=dtype, device=device)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1)
    # The built-in task index is only read when a task is named, not given as a file.
    manager = TaskManager(include_defaults=any(isinstance(t, str) for t in tasks))
    with _quiet_lm_eval():
        try:
            res = simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit)
        except KeyError as exc:
            raise InputError(f"--tasks: lm-eval knows no task {exc}; pass a task name or a task YAML") from None
    return {t: {k: v for k, v in r.items() if isinstance(v, (int, float))} for t, r in res["results"].items()}

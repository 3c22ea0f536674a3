"""What ``eval`` compares, checked before any work: the two models, the text, the settings.

:func:`check_inputs` resolves the model (a Tucker checkpoint or shard set, or ``demo``) and
its baseline (by default the source its Tucker manifest records), checks that the baseline
is that source (the same folder, or the same safetensors by the sha256s recorded at
decomposition; :func:`baseline_mismatch`), that both share vocabulary and shapes, the dtype,
the window length (clamped to ``max_position_embeddings``, with a note), which windows
(``skip_windows``, ``max_windows``), the runtime, and the task files: every mistake is one line
before a model is loaded. :func:`read_windows` then reads and tokenises the text and cuts its
windows (:class:`EvalText`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from tuckerize.checkpoint import Checkpoint, load_config, resolve_model
from tuckerize.demo import resolve_demo
from tuckerize.errors import InputError, TuckerizeError
from tuckerize.evaluate.cache import verified_cache
from tuckerize.evaluate.runtimes import Runtime, check_tensor_parallel, get_runtime
from tuckerize.evaluate.scoring import token_windows
from tuckerize.evaluate.tasks import resolve_tasks
from tuckerize.format import MANIFEST_NAME
from tuckerize.integrity import verify_files
from tuckerize.shardset import SHARD_MANIFEST, check_shard_manifest, tucker_manifest
from tuckerize.text import read_text

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class EvalInputs:
    """The checked inputs of one evaluation."""

    model: str
    baseline: str
    tucker_config: dict[str, Any]
    base_config: dict[str, Any]
    manifest: dict[str, Any] | None
    dtype: str
    torch_dtype: torch.dtype
    seqlen: int
    seqlen_requested: int
    runtime: Runtime
    skip_windows: int = 0
    max_windows: int | None = None
    shard_manifest: dict[str, Any] | None = None
    tensor_parallel: int = 1
    given_text: tuple[str, str] | None = None
    task_files: list[Path] = field(default_factory=list)
    lm_tasks: list[Any] | None = None


@dataclass
class EvalText:
    """The text, tokenised whole (``ids``), and the windows scored ``[n, seqlen]``: windows
    ``first_window`` to ``first_window + n - 1`` of the text's ``windows_in_text``."""

    label: str
    sha256: str
    ids: torch.Tensor
    windows: torch.Tensor
    tokenizer: Any
    first_window: int = 0
    windows_in_text: int = 0


def load_text(text: str | None, model_folder: Path | None) -> tuple[str, str]:
    """``(label, text)`` for ``--text`` (:func:`tuckerize.text.read_text`: a file, ``demo``
    = ``demo-heldout``, ``wikitext2``, ...), or None: the model's own held-out text if it
    has one (the demo models), else WikiText-2."""
    if text is None:
        text = str(model_folder / "heldout.txt") if (model_folder / "heldout.txt").is_file() else "wikitext2"
    raw, label = read_text(text, "eval")
    return label, raw


def check_comparable(model: str, tucker_config: dict[str, Any], baseline: str, base_config: dict[str, Any]) -> None:
    """The two models must share vocabulary and shapes to be compared token by token and layer by layer."""
    for key, what in (("vocab_size", "vocabulary size"), ("hidden_size", "hidden size"),
                      ("num_hidden_layers", "number of layers")):
        a, b = base_config.get(key), tucker_config.get(key)
        if a is not None and b is not None and a != b:
            raise InputError(f"--baseline {baseline} has {what} {a}, the model {model} has {b}: they cannot be "
                             "compared; pass the original model the Tucker checkpoint was made from")


def baseline_mismatch(baseline: str, recorded: dict[str, Any], verify: bool) -> str | None:
    """Why ``baseline`` is not the source a Tucker manifest records (``recorded``), or None.

    The same folder is the source. Another folder must hold the same safetensors with the
    sha256s recorded at decomposition (hashed once, cached under the tuckerize cache folder;
    with ``verify=False`` names only)."""
    path = Path(baseline).resolve()
    if recorded.get("path") and Path(recorded["path"]).resolve() == path:
        return None
    files = recorded.get("files_sha256") or {}
    if not files:
        return None  # nothing recorded to compare with
    have = set(Checkpoint.open(path).files)
    if have != set(files):
        return f"its safetensors files ({len(have)}) are not those recorded ({len(files)})"
    if not verify:
        return None
    try:
        verify_files(path, {f: {"sha256": h} for f, h in files.items()}, manifest_name=MANIFEST_NAME,
                     fix="", cache_path=verified_cache(path))
    except TuckerizeError:
        return "its safetensors differ from the sha256s recorded at decomposition"
    return None


def _resolve_baseline(model: str, baseline: str | None, recorded: dict[str, Any]) -> str:
    if baseline is not None:
        return str(resolve_model(resolve_demo(baseline), flag="--baseline").path)
    baseline = recorded.get("path")
    if not baseline or not Path(baseline).is_dir():
        where = f" ({baseline}, recorded in its manifest, does not exist)" if baseline else ""
        raise InputError(f"cannot find the original model of {model}{where}; pass it with --baseline PATH")
    return baseline


def _check_identity(model: str, baseline: str, manifest: dict[str, Any] | None, verify: bool, allow_mismatch: bool,
                    note: Callable[[str], None]) -> None:
    recorded = (manifest or {}).get("source") or {}
    mismatch = baseline_mismatch(baseline, recorded, verify) if manifest else None
    if manifest is None:
        note(f"baseline identity not checked: no Tucker manifest found for {model}")
    elif mismatch:
        msg = (f"--baseline {baseline} is not the model {model} was decomposed from ({recorded.get('model') or recorded.get('path')}): "
               f"{mismatch}")
        if not allow_mismatch:
            raise InputError(f"{msg}; pass --baseline {recorded.get('path')} (or leave --baseline out), "
                             "or --allow-baseline-mismatch to compare anyway")
        note(f"warning: {msg}; compared anyway (--allow-baseline-mismatch)")


def _window_length(seqlen: int, configs: tuple[dict[str, Any], ...], note: Callable[[str], None]) -> int:
    if seqlen < 2:
        raise InputError(f"--seqlen {seqlen} must be at least 2")
    max_pos = min((int(c["max_position_embeddings"]) for c in configs if c.get("max_position_embeddings")),
                  default=None)
    if max_pos is not None and seqlen > max_pos:
        note(f"note: --seqlen {seqlen} is longer than the model's max_position_embeddings {max_pos}; "
             f"using windows of {max_pos} tokens")
        return max_pos
    return seqlen


def _window_range(skip_windows: int, max_windows: int | None) -> None:
    if skip_windows < 0:
        raise InputError(f"--skip-windows {skip_windows} must be 0 or more (the number of windows to leave out "
                         "at the start of the text)")
    if max_windows is not None and max_windows < 1:
        raise InputError(f"--max-windows {max_windows} must be at least 1; leave it out to score every window")


def _task_files(paths: list[str] | None) -> list[Path]:
    files = [Path(p) for p in paths or ()]
    for p in files:
        if not p.is_file():
            raise InputError(f"task file {p} does not exist")
    return files


def check_inputs(model: str, baseline: str | None, *, text: str | None, seqlen: int, dtype: str, runtime: str,
                 verify: bool, allow_baseline_mismatch: bool, tasks_jsonl: list[str] | None, tasks: list[str] | None,
                 note: Callable[[str], None], skip_windows: int = 0, max_windows: int | None = None,
                 tensor_parallel: int = 1) -> EvalInputs:
    """Every check of the module docstring, in the order a user fixes them; ``note`` receives
    the notes and warnings."""
    _window_range(skip_windows, max_windows)
    # A given --text is checked first (missing, binary): before any model is opened.
    given_text = load_text(text, None) if text is not None else None
    chosen = get_runtime(runtime)
    check_tensor_parallel(chosen, tensor_parallel)
    model = resolve_demo(model)
    folder = Path(model)
    if not folder.is_dir():
        raise InputError(f"--model {model} does not exist; pass a Tucker checkpoint or shard folder")
    tucker_config = load_config(folder)
    manifest = tucker_manifest(folder)
    shard_manifest = check_shard_manifest(folder / SHARD_MANIFEST) if (folder / SHARD_MANIFEST).is_file() else None
    baseline = _resolve_baseline(model, baseline, (manifest or {}).get("source") or {})
    base_config = load_config(Path(baseline))
    check_comparable(model, tucker_config, baseline, base_config)
    _check_identity(model, baseline, manifest, verify, allow_baseline_mismatch, note)
    if dtype not in DTYPES:
        raise InputError(f"--dtype {dtype} is not one of float32, bfloat16, float16")
    window = _window_length(seqlen, (base_config, tucker_config), note)
    return EvalInputs(model=model, baseline=baseline, tucker_config=tucker_config, base_config=base_config,
                      manifest=manifest, dtype=dtype, torch_dtype=DTYPES[dtype], seqlen=window,
                      seqlen_requested=seqlen, runtime=chosen, tensor_parallel=tensor_parallel,
                      skip_windows=skip_windows,
                      max_windows=max_windows, shard_manifest=shard_manifest, given_text=given_text,
                      task_files=_task_files(tasks_jsonl), lm_tasks=resolve_tasks(tasks) if tasks else None)


def read_windows(inputs: EvalInputs) -> EvalText:
    """The baseline's tokenizer, the text (``--text`` or the baseline's own) and the windows
    to score (the first ``inputs.skip_windows`` left out, at most ``inputs.max_windows``)."""
    from transformers import AutoTokenizer

    from tuckerize.runtime.hf import quiet_transformers

    with quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(inputs.baseline)
    label, raw = inputs.given_text if inputs.given_text is not None else load_text(None, Path(inputs.baseline))
    with quiet_transformers():  # the whole text is longer than model_max_length; windows are cut below
        ids = torch.tensor(tokenizer(raw, add_special_tokens=False)["input_ids"], dtype=torch.long)
    windows = token_windows(ids, inputs.seqlen, inputs.max_windows, inputs.skip_windows)
    return EvalText(label=label, sha256=hashlib.sha256(raw.encode()).hexdigest(), ids=ids, windows=windows,
                    tokenizer=tokenizer, first_window=inputs.skip_windows,
                    windows_in_text=ids.numel() // inputs.seqlen)

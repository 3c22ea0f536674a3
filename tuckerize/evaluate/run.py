"""``tuckerize eval`` as one library call: :func:`evaluate`.

The steps, each in its own module: the inputs checked (:mod:`.inputs`), the process group
set up, the text's windows, the original scored or taken from the cache (:mod:`.cache`,
:mod:`.scoring`), the Tucker model loaded by its runtime (:mod:`.runtimes`) and scored on
the same windows, the per-layer error, the report (:mod:`.report`), the tasks
(:mod:`.tasks`). Runs alone or under ``torchrun --nproc_per_node N``: every rank computes,
rank 0 reports.
"""

from __future__ import annotations

import time
from typing import Any, Callable

from tuckerize.errors import BackendError, OutputError
from tuckerize.evaluate.cache import baseline_path, load_cached_baseline, save_cached_baseline
from tuckerize.evaluate.inputs import EvalInputs, EvalText, check_inputs, read_windows
from tuckerize.evaluate.report import build_report
from tuckerize.evaluate.runtimes import EvalModel, load_model
from tuckerize.evaluate.scoring import layer_errors, score_baseline, score_tucker
from tuckerize.evaluate.tasks import max_length, score_jsonl, score_lm_eval
from tuckerize.parallel import ParallelContext, agreed, init_from_env
from tuckerize.progress import Progress, ensure
from tuckerize.runtime.loader import TensorSource


class _Notes:
    """Notes and warnings of one evaluation: kept for the report, handed to ``on_note`` once
    the checks passed (an error is then the only line a user sees)."""

    def __init__(self, on_note: Callable[[str], None] | None):
        self.lines: list[str] = []
        self.on_note = on_note
        self.emit = False

    def __call__(self, line: str) -> None:
        self.lines.append(line)
        if self.on_note is not None and self.emit:
            self.on_note(line)

    def release(self) -> None:
        self.emit = True
        for line in self.lines if self.on_note is not None else ():
            self.on_note(line)


def _baseline_scores(inputs: EvalInputs, text: EvalText, parallel: ParallelContext, device, kl_topk: int,
                     use_cache: bool, note: Callable[[str], None], progress: Progress) -> tuple[dict[str, Any], bool]:
    """The original's scores on the windows, from the cache or computed (and cached)."""
    which = (text.first_window, len(text.windows))
    cache_file = baseline_path(inputs.baseline, text.sha256, inputs.seqlen, which, inputs.dtype, kl_topk)
    base = load_cached_baseline(cache_file, which, inputs.seqlen, kl_topk) if use_cache else None
    if base is not None:
        return base, True
    runtime = inputs.runtime.baseline_runtime
    base_model = agreed(parallel, lambda: load_model(inputs.baseline, parallel, device, inputs.torch_dtype, runtime))
    base = score_baseline(base_model, text.windows, kl_topk, device, progress)
    del base_model
    if use_cache and parallel.rank == 0:
        try:
            save_cached_baseline(cache_file, base, which)
        except (OSError, OutputError) as exc:  # a cache is optional: never lose the evaluation to it
            note(f"note: the baseline could not be cached in {cache_file.parent} "
                 f"({getattr(exc, 'strerror', None) or exc}); it will be recomputed next time")
    return base, False


def _task_scores(inputs: EvalInputs, text: EvalText, tucker_model: EvalModel, parallel: ParallelContext, device,
                 task_limit: int | None) -> dict[str, Any]:
    """``tasks_jsonl`` (every runtime) and ``lm_eval`` (transformers, one process) of the report."""
    out: dict[str, Any] = {}
    if inputs.task_files:
        out["tasks_jsonl"] = {}
        limits = {m: max_length(c, text.tokenizer) for m, c in (("baseline", inputs.base_config),
                                                                 ("tucker", inputs.tucker_config))}
        for path in inputs.task_files:
            base_model = load_model(inputs.baseline, parallel, device, inputs.torch_dtype,
                                    inputs.runtime.baseline_runtime)
            out["tasks_jsonl"][path.stem] = {
                "baseline": score_jsonl(base_model, text.tokenizer, path, device, task_limit, limits["baseline"]),
                "tucker": score_jsonl(tucker_model, text.tokenizer, path, device, task_limit, limits["tucker"]),
            }
            del base_model
    if inputs.lm_tasks:
        out["lm_eval"] = {
            "baseline": score_lm_eval(inputs.baseline, text.tokenizer, inputs.lm_tasks, inputs.torch_dtype, device,
                                      task_limit),
            "tucker": score_lm_eval(inputs.model, text.tokenizer, inputs.lm_tasks, inputs.torch_dtype, device,
                                    task_limit),
        }
    return out


def evaluate(
    model: str,
    baseline: str | None = None,
    *,
    text: str | None = None,
    seqlen: int = 2048,
    max_windows: int | None = None,
    skip_windows: int = 0,
    backend: str = "cpu",
    dtype: str = "float32",
    runtime: str = "auto",
    kl_topk: int = 256,
    layer_tokens: int = 512,
    tasks_jsonl: list[str] | None = None,
    tasks: list[str] | None = None,
    task_limit: int | None = None,
    use_cache: bool = True,
    verify: bool = True,
    allow_baseline_mismatch: bool = False,
    on_note: Callable[[str], None] | None = None,
    progress: Progress | None = None,
    tensor_parallel: int = 1,
) -> dict[str, Any]:
    """Evaluate ``model`` (Tucker checkpoint or shard set) against ``baseline`` (the original;
    by default the source recorded in the Tucker manifest). Returns the report
    (:mod:`tuckerize.evaluate.report`).

    Before any work: the model's files are checked against their manifest's sha256s
    (``verify``; sizes always), the baseline against the source the Tucker manifest records
    (a different model is refused unless ``allow_baseline_mismatch``, then the report carries
    a warning), vocabulary and shapes against the Tucker model's, and ``seqlen`` is clamped to
    the model's ``max_position_embeddings`` (:func:`tuckerize.evaluate.inputs.check_inputs`).
    The text's windows are cut from its first token; ``skip_windows`` leaves out the first ones
    (e.g. the text a setting was chosen on), ``max_windows`` scores at most that many of the rest.
    ``runtime``: a name of :mod:`tuckerize.evaluate.runtimes`; ``tensor_parallel``: the
    tensor-parallel size of a runtime that starts its own ranks (``vllm``; the native runtime's
    is torchrun's world size). ``tasks_jsonl``: local JSONL
    files; ``tasks``: lm-eval task names or task YAML files / folders
    (:mod:`tuckerize.evaluate.tasks`). ``on_note(line)`` receives each note or warning as it
    happens (they are also in ``report["notes"]``). Under torchrun every rank agrees on these
    checks (one collective), so one rank's error stops all ranks with the same message.
    """
    progress = ensure(progress)
    started = time.time()
    note = _Notes(on_note)
    inputs = check_inputs(model, baseline, text=text, seqlen=seqlen, dtype=dtype, runtime=runtime, verify=verify,
                          allow_baseline_mismatch=allow_baseline_mismatch, tasks_jsonl=tasks_jsonl, tasks=tasks,
                          note=note, skip_windows=skip_windows, max_windows=max_windows,
                          tensor_parallel=tensor_parallel)
    windows = read_windows(inputs)  # a window range the text cannot give is said before any model file is read
    parallel, device = init_from_env(backend, flag="--backend")
    if inputs.lm_tasks and parallel.world > 1:
        raise BackendError("--tasks (lm-eval) runs in one process; start without torchrun")
    # Every rank checks its own files; all agree before any collective work starts.
    agreed(parallel, lambda: TensorSource.open(inputs.model, parallel, verify=verify))
    note.release()

    base, base_cached = _baseline_scores(inputs, windows, parallel, device, kl_topk, use_cache, note, progress)
    tucker_model = agreed(parallel, lambda: load_model(inputs.model, parallel, device, inputs.torch_dtype,
                                                       inputs.runtime.name, verify=False, seqlen=inputs.seqlen,
                                                       kl_topk=kl_topk, tensor_parallel=inputs.tensor_parallel))
    tk = score_tucker(tucker_model, windows.windows, base, device, layer_tokens, progress)
    per_layer = layer_errors(tucker_model, inputs.baseline, tk.pop("inputs"), parallel, device, inputs.torch_dtype,
                             progress)
    report = build_report(inputs, windows, base, base_cached, tk, per_layer, tucker_model, parallel, device,
                          {"backend": backend, "kl_topk": kl_topk, "layer_tokens": layer_tokens, "verify": verify,
                           "tensor_parallel": inputs.tensor_parallel})
    report.update(_task_scores(inputs, windows, tucker_model, parallel, device, task_limit))
    report["notes"] = note.lines
    report["wall_seconds"] = time.time() - started
    return report

"""``tuckerize eval``: perplexity, fidelity and task accuracy of a Tucker model against its original.

Conventions (DESIGN.md): the text is tokenised whole, cut into non-overlapping windows of
``seqlen`` tokens (the remainder dropped), each window scored on its ``seqlen - 1``
next-token predictions; perplexity is exp of the mean token cross-entropy. Baseline and
Tucker model are scored on exactly the same windows.

Fidelity: per-token KL(original || Tucker) of the next-token distributions, top-1
agreement, and the relative error of every MoE block's output on the same inputs (the
inputs the Tucker model's blocks see on the first ``layer_tokens`` tokens, fed to the
original dense block of that layer, one layer in memory at a time).

The KL uses the original model's top-``kl_topk`` probabilities plus one bucket for the
rest of the vocabulary (exact when ``kl_topk`` covers the vocabulary; otherwise a lower
bound, tight when the tail mass is small). This is what lets the baseline be cached per
model and text, so comparing several rank choices does not recompute it.

Runs alone or under ``torchrun --nproc_per_node N``: every rank computes, rank 0 reports.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from tuckerize.version import __version__
from tuckerize.demo import resolve_demo
from tuckerize.errors import BackendError, InputError, OutputError
from tuckerize.progress import Progress, ensure
from tuckerize.shardset import tucker_manifest
from tuckerize.parallel import agreed
from tuckerize.parallel import ParallelContext

CACHE_DIR = Path(os.environ.get("TUCKERIZE_CACHE", Path.home() / ".cache" / "tuckerize")) / "baselines"


# -- text -------------------------------------------------------------------------------------
def load_text(text: str | None, model_folder: Path | None) -> tuple[str, str]:
    """``(label, text)`` for ``--text`` (:func:`tuckerize.text.read_text`: a file, ``demo``
    = ``demo-heldout``, ``wikitext2``, ...), or None: the model's own held-out text if it
    has one (the demo models), else WikiText-2."""
    from tuckerize.text import read_text

    if text is None:
        text = str(model_folder / "heldout.txt") if (model_folder / "heldout.txt").is_file() else "wikitext2"
    raw, label = read_text(text, "eval")
    return label, raw


def token_windows(ids: torch.Tensor, seqlen: int, max_windows: int | None) -> torch.Tensor:
    n = ids.numel() // seqlen
    if max_windows:
        n = min(n, max_windows)
    if n == 0:
        raise InputError(f"the text has {ids.numel()} tokens, fewer than one window of --seqlen {seqlen}; "
                         "use a longer text or a smaller --seqlen")
    return ids[: n * seqlen].view(n, seqlen)


# -- distributed set-up -----------------------------------------------------------------------
def setup(backend: str) -> tuple[ParallelContext, torch.device]:
    """Device and process group from ``--backend`` and torchrun's environment."""
    from tuckerize.parallel import init_from_env

    return init_from_env(backend, flag="--backend")


# -- models -----------------------------------------------------------------------------------
@dataclass
class EvalModel:
    name: str
    forward: Callable[[torch.Tensor], torch.Tensor]
    module: torch.nn.Module
    runtime: str
    moe_blocks: dict[int, torch.nn.Module]


def load_model(path: str, parallel: ParallelContext, device, dtype, runtime: str = "auto",
               verify: bool = True, seqlen: int = 2048, kl_topk: int = 256) -> EvalModel:
    if runtime == "vllm":  # the vLLM plugin's scorer (tuckerize/integrations/vllm/evaluate.py)
        from tuckerize.integrations.vllm.evaluate import load_vllm_eval_model

        return load_vllm_eval_model(path, dtype, seqlen=seqlen, kl_topk=kl_topk)
    from tuckerize.runtime.loader import TensorSource
    from tuckerize.runtime.model import CausalLM, native_supported

    source = TensorSource.open(path, parallel, verify=verify)
    native = native_supported(source.spec.arch.name)
    if runtime == "native" and not native:
        raise InputError(f"the native runtime does not cover {source.spec.arch.classes[0]}; use --runtime hf")
    if runtime == "hf" or (runtime == "auto" and not native):
        if parallel.world > 1:
            raise BackendError("the transformers runtime (--runtime hf) runs in one process; start without torchrun")
        if source.kind == "shard":
            raise InputError("the transformers runtime loads a Tucker checkpoint, not a shard set; pass the unsharded folder")
        from tuckerize.runtime.hf import load_hf_model

        model = load_hf_model(path, dtype=dtype, device=device)
        blocks = {i: model.model.layers[i].mlp for i in source.spec.moe_layers}
        return EvalModel(path, lambda ids: model(ids).logits, model, "hf", blocks)
    model = CausalLM(source, dense_experts=not source.is_tucker, dtype=dtype, device=device).eval()
    return EvalModel(path, model, model, "native", model.moe_blocks())


# -- scoring ----------------------------------------------------------------------------------
def _baseline_key(baseline: str, text_sha: str, seqlen: int, n_windows: int, dtype: str, topk: int) -> str:
    folder = Path(baseline)
    ident = [str(folder.resolve())]
    for f in sorted(folder.glob("*.safetensors")) + [folder / "config.json"]:
        if f.is_file():
            st = f.stat()
            ident.append(f"{f.name}:{st.st_size}:{int(st.st_mtime)}")
    blob = json.dumps([ident, text_sha, seqlen, n_windows, dtype, topk, __version__])
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


_CACHE_TENSORS = ("nll", "top1", "lp_top", "idx_top")


def load_cached_baseline(path: Path, n_windows: int, seqlen: int, topk: int) -> dict[str, Any] | None:
    """A baseline cached by :func:`save_cached_baseline`, or None when it is absent, truncated,
    corrupt or of other shapes (then it is recomputed and written again). Never unpickles:
    safetensors tensors plus a JSON object in the file's metadata."""
    from safetensors.torch import load

    from tuckerize.checkpoint import read_header

    if not path.is_file():
        return None
    try:
        read_header(path)  # validated first: a damaged header is a miss, not a crash
        blob = path.read_bytes()  # read whole, not memory-mapped: a file truncated later cannot fault
        n = int.from_bytes(blob[:8], "little")
        meta = json.loads(json.loads(blob[8:8 + n])["__metadata__"]["tuckerize_baseline"])
        tensors = load(blob)
        base = {k: tensors[k] for k in _CACHE_TENSORS}
        seconds, vocab = float(meta["seconds"]), int(meta["vocab"])
    except Exception:  # safetensors raises its own error types for a damaged file
        return None
    k = min(topk, vocab)
    want = {"nll": (n_windows, seqlen - 1), "top1": (n_windows, seqlen - 1), "lp_top": (n_windows, seqlen - 1, k),
            "idx_top": (n_windows, seqlen - 1, k)}
    if any(tuple(base[name].shape) != shape for name, shape in want.items()):
        return None
    return {**base, "seconds": seconds, "vocab": vocab}


def save_cached_baseline(path: Path, base: dict[str, Any]) -> None:
    """Write the scored baseline atomically as safetensors with a JSON metadata entry."""
    from tuckerize.checkpoint import save_safetensors

    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"tuckerize_baseline": json.dumps({"seconds": base["seconds"], "vocab": base["vocab"],
                                               "version": __version__})}
    save_safetensors({k: base[k] for k in _CACHE_TENSORS}, path, metadata=meta)


@torch.no_grad()
def score_baseline(model: EvalModel, windows: torch.Tensor, topk: int, device, progress: Progress) -> dict[str, Any]:
    nll, top1, lp_top, idx_top = [], [], [], []
    progress.start("baseline", len(windows))
    t0 = time.perf_counter()
    for w in windows:
        ids = w[None].to(device)
        logp = torch.log_softmax(model.forward(ids)[0, :-1].float(), -1)
        target = ids[0, 1:]
        nll.append(-logp.gather(-1, target[:, None])[:, 0].cpu())
        top1.append(logp.argmax(-1).cpu())
        v, i = logp.topk(min(topk, logp.shape[-1]), dim=-1)
        lp_top.append(v.cpu())
        idx_top.append(i.to(torch.int32).cpu())
        progress.advance("baseline")
    seconds = time.perf_counter() - t0
    progress.finish("baseline")
    return {"nll": torch.stack(nll), "top1": torch.stack(top1), "lp_top": torch.stack(lp_top),
            "idx_top": torch.stack(idx_top), "seconds": seconds, "vocab": int(logp.shape[-1])}


def _coarse_kl(lp_top: torch.Tensor, idx_top: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p || q) over the top-k of p plus one bucket for the rest, per token (float64).
    No bucket when the top-k covers the vocabulary: 1 - sum(p) is then rounding only,
    and a rounding-sized p_rest against q_rest ~ 0 made a spurious term of ~1e-6."""
    lp_top, logq = lp_top.double(), logq.double()
    p = lp_top.exp()
    lq = logq.gather(-1, idx_top.long())
    kl = (p * (lp_top - lq)).sum(-1)
    if lp_top.shape[-1] >= logq.shape[-1]:
        return kl
    p_rest = (1 - p.sum(-1)).clamp_min(0)
    # log of q's mass outside p's top-k, summed in log space (1 - sum(q_top) cancels)
    log_q_rest = logq.scatter(-1, idx_top.long(), float("-inf")).logsumexp(-1)
    tail = torch.where(p_rest > 1e-12, p_rest * (torch.log(p_rest.clamp_min(1e-300)) - log_q_rest),
                       torch.zeros_like(p_rest))
    return kl + tail


@torch.no_grad()
def score_tucker(model: EvalModel, windows: torch.Tensor, base: dict[str, Any], device, layer_tokens: int,
                 progress: Progress) -> dict[str, Any]:
    captured: dict[int, list[torch.Tensor]] = {i: [] for i in model.moe_blocks}
    budget = {"left": layer_tokens}

    def hook(layer):
        def fn(_mod, args):
            if budget["left"] > 0:
                x = args[0].reshape(-1, args[0].shape[-1])
                captured[layer].append(x[: budget["left"]].detach().clone())
        return fn

    handles = [blk.register_forward_pre_hook(hook(i)) for i, blk in model.moe_blocks.items()]
    nll, kl, agree = [], [], []
    progress.start("tucker", len(windows))
    t0 = time.perf_counter()
    for n, w in enumerate(windows):
        ids = w[None].to(device)
        logq = torch.log_softmax(model.forward(ids)[0, :-1].float(), -1).cpu()
        if n == 0 or budget["left"] > 0:
            budget["left"] -= ids.numel()
            if budget["left"] <= 0:
                for h in handles:
                    h.remove()
                handles = []
        target = ids[0, 1:].cpu()
        nll.append(-logq.gather(-1, target[:, None])[:, 0])
        kl.append(_coarse_kl(base["lp_top"][n].float(), base["idx_top"][n], logq))
        agree.append((logq.argmax(-1) == base["top1"][n]).float())
        progress.advance("tucker")
    seconds = time.perf_counter() - t0
    for h in handles:
        h.remove()
    progress.finish("tucker")
    inputs = {i: torch.cat(v)[:layer_tokens] for i, v in captured.items() if v}
    return {"nll": torch.stack(nll), "kl": torch.stack(kl), "agree": torch.stack(agree), "seconds": seconds,
            "inputs": inputs}


@torch.no_grad()
def layer_errors(tucker: EvalModel, baseline_path: str, inputs: dict[int, torch.Tensor], parallel, device, dtype,
                 progress: Progress) -> dict[int, float]:
    """Relative error of each MoE block's output against the original dense block, same inputs."""
    from tuckerize.runtime.loader import TensorSource, build_moe_block

    source = TensorSource.open(baseline_path, parallel)
    out = {}
    progress.start("layers", len(inputs))
    for layer, x in sorted(inputs.items()):
        dense = build_moe_block(source, layer, dense=True, dtype=dtype, device=device)
        ref = dense(x)
        got = tucker.moe_blocks[layer](x[None])  # transformers' MoE blocks take [batch, seq, hidden]
        if isinstance(got, tuple):
            got = got[0]
        got = got.reshape(ref.shape)
        out[layer] = float((got.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30))
        del dense
        progress.advance("layers", layer=layer)
    progress.finish("layers")
    return out


# -- tasks ------------------------------------------------------------------------------------
@torch.no_grad()
def score_jsonl(model: EvalModel, tokenizer, path: Path, device, limit: int | None = None) -> dict[str, float]:
    """Multiple-choice accuracy by log-likelihood on a local JSONL file with lines
    ``{"context": str, "choices": [str, ...], "label": int}``: ``acc`` takes the choice with
    the highest summed log-probability, ``acc_norm`` the highest per character."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if limit:
        rows = rows[:limit]
    if not rows:
        raise InputError(f"task file {path} has no examples")
    acc = acc_norm = 0
    for row in rows:
        try:
            ctx, choices, label = row["context"], row["choices"], int(row["label"])
        except (KeyError, TypeError, ValueError):
            raise InputError(f"{path}: each line needs context, choices and label") from None
        ctx_ids = tokenizer(ctx, add_special_tokens=False)["input_ids"]
        scores, norms = [], []
        for choice in choices:
            cont = tokenizer(choice, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([ctx_ids + cont], device=device)
            logp = torch.log_softmax(model.forward(ids)[0, :-1].float(), -1)
            pos = torch.arange(len(ctx_ids) - 1, ids.shape[1] - 1, device=device)
            s = float(logp[pos, ids[0, pos + 1]].sum())
            scores.append(s)
            norms.append(s / max(1, len(choice)))
        acc += int(max(range(len(choices)), key=scores.__getitem__) == label)
        acc_norm += int(max(range(len(choices)), key=norms.__getitem__) == label)
    return {"acc": acc / len(rows), "acc_norm": acc_norm / len(rows), "examples": len(rows)}


def score_lm_eval(model_path: str, tokenizer, tasks: list[str], dtype, device, limit: int | None) -> dict[str, Any]:
    """lm-eval-harness tasks on the transformers path (single process), the model wrapped as built."""
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        raise InputError("--tasks needs lm-eval-harness: pip install 'tuckerize[eval]'") from None
    from tuckerize.runtime.hf import load_hf_model

    model = load_hf_model(model_path, dtype=dtype, device=device)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1)
    res = simple_evaluate(model=lm, tasks=tasks, limit=limit)
    return {t: {k: v for k, v in r.items() if isinstance(v, (int, float))} for t, r in res["results"].items()}


# -- the command ------------------------------------------------------------------------------
def evaluate(
    model: str,
    baseline: str | None = None,
    *,
    text: str | None = None,
    seqlen: int = 2048,
    max_windows: int | None = None,
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
) -> dict[str, Any]:
    """Evaluate ``model`` (Tucker checkpoint or shard set) against ``baseline`` (the original;
    by default the source recorded in the Tucker manifest). Returns the report.

    Before any work: the model's files are checked against their manifest's sha256s
    (``verify``; sizes always), the baseline against the source the Tucker manifest records
    (a different model is refused unless ``allow_baseline_mismatch``, then the report carries
    a warning), vocabulary and shapes against the Tucker model's, and ``seqlen`` is clamped to
    the model's ``max_position_embeddings``. ``on_note(line)`` receives each note or warning
    as it happens (they are also in ``report["notes"]``). Under torchrun every rank agrees on
    these checks (one collective), so one rank's error stops all ranks with the same message.
    """
    from transformers import AutoTokenizer

    from tuckerize.checkpoint import load_config, resolve_model
    from tuckerize.runtime.hf import quiet_transformers

    progress = ensure(progress)
    started = time.time()
    notes: list[str] = []
    ready = {"emit": False}  # notes are handed out once the checks passed (an error is then the only line)

    def note(line: str) -> None:
        notes.append(line)
        if on_note is not None and ready["emit"]:
            on_note(line)

    # A given --text is checked first (missing, binary): before any model is opened.
    given_text = load_text(text, None) if text is not None else None
    model = resolve_demo(model)
    folder = Path(model)
    if not folder.is_dir():
        raise InputError(f"--model {model} does not exist; pass a Tucker checkpoint or shard folder")
    tucker_config = load_config(folder)
    manifest = tucker_manifest(folder)
    recorded = (manifest or {}).get("source") or {}
    if baseline is None:
        baseline = recorded.get("path")
        if not baseline or not Path(baseline).is_dir():
            where = f" ({baseline}, recorded in its manifest, does not exist)" if baseline else ""
            raise InputError(f"cannot find the original model of {model}{where}; pass it with --baseline PATH")
    else:
        baseline = str(resolve_model(resolve_demo(baseline), flag="--baseline").path)
    base_config = load_config(Path(baseline))
    _check_comparable(model, tucker_config, baseline, base_config)
    mismatch = _baseline_mismatch(baseline, recorded, verify) if manifest else None
    if manifest is None:
        note(f"baseline identity not checked: no Tucker manifest found for {model}")
    elif mismatch:
        msg = (f"--baseline {baseline} is not the model {model} was decomposed from ({recorded.get('model') or recorded.get('path')}): "
               f"{mismatch}")
        if not allow_baseline_mismatch:
            raise InputError(f"{msg}; pass --baseline {recorded.get('path')} (or leave --baseline out), "
                             "or --allow-baseline-mismatch to compare anyway")
        note(f"warning: {msg}; compared anyway (--allow-baseline-mismatch)")
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype)
    if torch_dtype is None:
        raise InputError(f"--dtype {dtype} is not one of float32, bfloat16, float16")
    if seqlen < 2:
        raise InputError(f"--seqlen {seqlen} must be at least 2")
    seqlen_requested = seqlen
    max_pos = min((int(c["max_position_embeddings"]) for c in (base_config, tucker_config)
                   if c.get("max_position_embeddings")), default=None)
    if max_pos is not None and seqlen > max_pos:
        seqlen = max_pos
        note(f"note: --seqlen {seqlen_requested} is longer than the model's max_position_embeddings {max_pos}; "
             f"using windows of {max_pos} tokens")
    parallel, device = setup(backend)

    # Every rank checks its own files; all agree before any collective work starts.
    from tuckerize.runtime.loader import TensorSource

    agreed(parallel, lambda: TensorSource.open(model, parallel, verify=verify))

    with quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(baseline)
    text_label, raw = given_text if given_text is not None else load_text(None, Path(baseline))
    with quiet_transformers():  # the whole text is longer than model_max_length; windows are cut below
        ids = torch.tensor(tokenizer(raw, add_special_tokens=False)["input_ids"], dtype=torch.long)
    windows = token_windows(ids, seqlen, max_windows)
    ready["emit"] = True
    for line in notes if on_note is not None else ():
        on_note(line)
    text_sha = hashlib.sha256(raw.encode()).hexdigest()

    key = _baseline_key(baseline, text_sha, seqlen, len(windows), dtype, kl_topk)
    cache_file = CACHE_DIR / f"{key}.safetensors"
    base = load_cached_baseline(cache_file, len(windows), seqlen, kl_topk) if use_cache else None
    base_cached = base is not None
    if base is None:
        base_model = agreed(parallel, lambda: load_model(baseline, parallel, device, torch_dtype,
                                                         "auto" if runtime == "vllm" else runtime))
        base = score_baseline(base_model, windows, kl_topk, device, progress)
        del base_model
        if use_cache and parallel.rank == 0:
            try:
                save_cached_baseline(cache_file, base)
            except (OSError, OutputError) as exc:  # a cache is optional: never lose the evaluation to it
                note(f"note: the baseline could not be cached in {cache_file.parent} "
                     f"({getattr(exc, 'strerror', None) or exc}); it will be recomputed next time")

    tucker_model = agreed(parallel, lambda: load_model(model, parallel, device, torch_dtype, runtime, verify=False,
                                                       seqlen=seqlen, kl_topk=kl_topk))
    tk = score_tucker(tucker_model, windows, base, device, layer_tokens, progress)
    per_layer = layer_errors(tucker_model, baseline, tk.pop("inputs"), parallel, device, torch_dtype, progress)

    n_tokens = int(base["nll"].numel())
    report: dict[str, Any] = {
        "tool": "tuckerize", "version": __version__,
        "model": str(folder), "baseline": str(baseline),
        "settings": {"seqlen": seqlen, "seqlen_requested": seqlen_requested, "backend": backend,
                     "device": str(device), "dtype": dtype,
                     "runtime": tucker_model.runtime, "world_size": parallel.world, "kl_topk": kl_topk,
                     "kl": "exact" if base["lp_top"].shape[-1] >= base["vocab"]
                     else f"top-{base['lp_top'].shape[-1]} of {base['vocab']} + rest bucket (a lower bound)",
                     "layer_tokens": layer_tokens, "verified": verify},
        "text": {"source": text_label, "sha256": text_sha, "tokens_in_text": int(ids.numel()),
                 "windows": len(windows), "tokens_scored": n_tokens},
        "baseline_result": {"perplexity": _exp(float(base["nll"].mean())), "mean_nll": float(base["nll"].mean()),
                            "cached": base_cached, "tokens_per_s": None if base_cached else
                            windows.numel() / max(base["seconds"], 1e-9)},
        "tucker_result": {"perplexity": _exp(float(tk["nll"].mean())), "mean_nll": float(tk["nll"].mean()),
                          "tokens_per_s": windows.numel() / max(tk["seconds"], 1e-9)},
        "fidelity": {"kl_mean": float(tk["kl"].mean()), "top1_agreement": float(tk["agree"].mean()),
                     "layer_relative_error": {str(k): v for k, v in per_layer.items()}},
        "tokens_used": windows.reshape(-1)[:64].tolist(),
    }
    b_ppl, t_ppl = report["baseline_result"]["perplexity"], report["tucker_result"]["perplexity"]
    report["perplexity_ratio"] = t_ppl / b_ppl if math.isfinite(b_ppl) and math.isfinite(t_ppl) else math.inf
    if manifest:
        report["compression"] = manifest.get("params")
        if manifest.get("bytes"):
            report["compression_bytes"] = manifest["bytes"]
    from tuckerize.runtime.tucker_experts import memory_per_layer

    mem = memory_per_layer([getattr(b, "experts", None) for b in tucker_model.moe_blocks.values()])
    if mem is not None:  # this rank's experts as loaded (quantised factors dequantised), per MoE layer
        report["memory"] = {"experts_per_layer_bytes": mem, "rank": parallel.rank,
                            "factor_storage": tucker_config.get("tucker", {}).get("factor_storage")}
    if tasks_jsonl:
        report["tasks_jsonl"] = {}
        for path in tasks_jsonl:
            p = Path(path)
            if not p.is_file():
                raise InputError(f"task file {path} does not exist")
            base_model = load_model(baseline, parallel, device, torch_dtype, runtime)
            report["tasks_jsonl"][p.stem] = {
                "baseline": score_jsonl(base_model, tokenizer, p, device, task_limit),
                "tucker": score_jsonl(tucker_model, tokenizer, p, device, task_limit),
            }
            del base_model
    if tasks:
        if parallel.world > 1:
            raise BackendError("--tasks (lm-eval) runs in one process; start without torchrun")
        report["lm_eval"] = {
            "baseline": score_lm_eval(baseline, tokenizer, tasks, torch_dtype, device, task_limit),
            "tucker": score_lm_eval(model, tokenizer, tasks, torch_dtype, device, task_limit),
        }
    report["notes"] = notes
    report["wall_seconds"] = time.time() - started
    return report


def _exp(x: float) -> float:
    """exp(x), inf where it overflows (a perplexity of a badly broken model)."""
    return math.exp(x) if x < 709.0 else math.inf


def _check_comparable(model: str, tucker_config: dict[str, Any], baseline: str, base_config: dict[str, Any]) -> None:
    """The two models must share vocabulary and shapes to be compared token by token and layer by layer."""
    for key, what in (("vocab_size", "vocabulary size"), ("hidden_size", "hidden size"),
                      ("num_hidden_layers", "number of layers")):
        a, b = base_config.get(key), tucker_config.get(key)
        if a is not None and b is not None and a != b:
            raise InputError(f"--baseline {baseline} has {what} {a}, the model {model} has {b}: they cannot be "
                             "compared; pass the original model the Tucker checkpoint was made from")


def _baseline_mismatch(baseline: str, recorded: dict[str, Any], verify: bool) -> str | None:
    """Why ``baseline`` is not the source a Tucker manifest records (``recorded``), or None.

    The same folder is the source. Another folder must hold the same safetensors with the
    sha256s recorded at decomposition (hashed once, cached under the tuckerize cache folder;
    with ``verify=False`` names only)."""
    from tuckerize.checkpoint import Checkpoint
    from tuckerize.errors import TuckerizeError
    from tuckerize.format import MANIFEST_NAME
    from tuckerize.integrity import verify_files

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
    cache = CACHE_DIR.parent / "verified" / (hashlib.sha256(str(path).encode()).hexdigest()[:24] + ".json")
    try:
        verify_files(path, {f: {"sha256": h} for f, h in files.items()}, manifest_name=MANIFEST_NAME,
                     fix="", cache_path=cache)
    except TuckerizeError:
        return "its safetensors differ from the sha256s recorded at decomposition"
    return None


def plot_report(report: dict[str, Any], path: str | Path) -> None:
    """PNG: per-layer MoE output error, and the two perplexities."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8), gridspec_kw={"width_ratios": [3, 1]})
    layers = sorted(report["fidelity"]["layer_relative_error"], key=int)
    a.bar([int(x) for x in layers], [report["fidelity"]["layer_relative_error"][x] for x in layers], color="#4477aa")
    a.set_xlabel("MoE layer")
    a.set_ylabel("relative error of block output")
    a.set_title("per-layer error (same inputs)")
    vals = [report["baseline_result"]["perplexity"], report["tucker_result"]["perplexity"]]
    b.bar(["original", "Tucker"], vals, color=["#999999", "#ee6677"])
    b.set_title("perplexity")
    for i, v in enumerate(vals):
        b.text(i, v, f"{v:.2f}", ha="center", va="bottom")
    fig.suptitle(Path(report["model"]).name)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)

"""``tuckerize eval --runtime vllm``: score a model through vLLM's prompt log-probabilities.

The model under test is served by vLLM (with this plugin for a Tucker checkpoint); each
window of ``S`` tokens is sent as a prompt with ``prompt_logprobs=k`` and the returned
log-probabilities are laid out as the rows ``[S, V]`` that :mod:`tuckerize.evaluate` expects
from a model's forward (row t: log q(. | tokens[:t+1]); the last row is not scored).

Importing this module registers the runtime ``vllm`` with the evaluation's registry
(:func:`tuckerize.evaluate.runtimes.register_runtime`); ``--runtime vllm`` imports it by
name (:data:`tuckerize.evaluate.runtimes.INTEGRATION_RUNTIMES`), so the core never imports
the plugin. The original model is scored by ``auto`` (the baseline runtime).

``k`` is the whole vocabulary when it is at most :data:`FULL_VOCAB_MAX` (then perplexity,
top-1 agreement and KL are exact); otherwise it is ``kl_topk`` and every token outside the
returned top-k gets an equal share of the remaining mass (perplexity and top-1 stay exact:
vLLM always returns the prompt token's own log-probability; KL terms for the original's
top-k tokens that fall outside the served model's top-k are then approximate).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from tuckerize.checkpoint import load_config
from tuckerize.errors import BackendError
from tuckerize.evaluate.runtimes import EvalModel, register_runtime
from tuckerize.integrations.vllm import check_vllm_version

#: Up to this vocabulary size the full distribution is requested per prompt token.
FULL_VOCAB_MAX = 32768


def open_llm(folder: str | Path, *, dtype: str = "float32", tensor_parallel_size: int = 1, max_model_len: int = 2049,
             max_logprobs: int = 20, enforce_eager: bool = True, seed: int = 0, **kwargs: Any):
    """A ``vllm.LLM`` for ``folder`` (a Tucker checkpoint loads through this plugin)."""
    try:
        from vllm import LLM
    except ImportError:
        raise BackendError("--runtime vllm needs vLLM: `make install-vllm` (CPU) or pip install a vLLM build, "
                           "then pip install -e '.[vllm]'") from None
    check_vllm_version()
    if tensor_parallel_size == 1:  # the model in the engine process itself (no worker processes)
        kwargs.setdefault("distributed_executor_backend", "uni")
    llm = LLM(model=str(folder), dtype=dtype, tensor_parallel_size=tensor_parallel_size,
              max_model_len=max_model_len, max_logprobs=max_logprobs, enforce_eager=enforce_eager, seed=seed,
              **kwargs)
    # Stop vLLM's engine before the interpreter tears down: left to finalisation, its
    # background threads can abort the process after the report was written (seen on CPU).
    import atexit

    atexit.register(llm.llm_engine.engine_core.shutdown)
    return llm


def logprob_rows(llm, ids: list[int], k: int, vocab: int) -> torch.Tensor:
    """``[S, V]`` float32 log-probabilities of the next token at each position of ``ids``
    (row S-1, beyond the prompt, is zeros), from vLLM's prompt logprobs."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=k, detokenize=False)
    out = llm.generate([{"prompt_token_ids": list(ids)}], params, use_tqdm=False)[0]
    rows = torch.zeros(len(ids), vocab, dtype=torch.float32)
    for t, entry in enumerate(out.prompt_logprobs[1:]):  # entry t: log q(ids[t+1] | ids[:t+1])
        idx = torch.tensor(list(entry.keys()), dtype=torch.long)
        lp = torch.tensor([v.logprob for v in entry.values()], dtype=torch.float64)
        if idx.numel() < vocab:
            rest = max(1.0 - float(lp.exp().sum()), 1e-30)
            rows[t].fill_(math.log(rest / (vocab - idx.numel())))
        rows[t, idx] = lp.float()
    return rows


def load_vllm_eval_model(path: str, dtype: torch.dtype, *, seqlen: int, kl_topk: int = 256, tensor_parallel_size: int = 1):
    """An :class:`tuckerize.evaluate.runtimes.EvalModel` whose forward asks vLLM for prompt logprobs.
    It has no MoE blocks in this process (they live in vLLM's workers), so the per-layer
    error is not reported for this runtime."""
    vocab = int(load_config(Path(path))["vocab_size"])
    k = vocab if vocab <= FULL_VOCAB_MAX else min(kl_topk, vocab)
    name = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[dtype]
    llm = open_llm(path, dtype=name, tensor_parallel_size=tensor_parallel_size, max_model_len=seqlen + 1,
                   max_logprobs=k)

    def forward(ids: torch.Tensor) -> torch.Tensor:
        return torch.stack([logprob_rows(llm, row.tolist(), k, vocab) for row in ids])

    return EvalModel(path, forward, torch.nn.Module(), "vllm", {})


def _load(path: str, parallel, device, dtype: torch.dtype, *, seqlen: int, kl_topk: int, tensor_parallel: int = 1,
          **_: object) -> EvalModel:
    """The runtime ``vllm``: one vLLM engine started from this process, at ``tensor_parallel``
    ranks (``eval --tp``; vLLM starts the worker processes and picks the devices)."""
    if parallel.world > 1:
        raise BackendError("--runtime vllm starts its own tensor-parallel workers: run eval without torchrun "
                           "and pass --tp N")
    return load_vllm_eval_model(path, dtype, seqlen=seqlen, kl_topk=kl_topk, tensor_parallel_size=tensor_parallel)


register_runtime("vllm", _load, baseline="auto", tensor_parallel=True)

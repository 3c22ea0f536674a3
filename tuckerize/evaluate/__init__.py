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

One module per concern (each says what it owns):

``run``       :func:`evaluate`, the steps in order
``inputs``    the checks before any work (models, baseline identity, settings, task files)
``runtimes``  :class:`EvalModel` and the registry of runtimes (native, hf, auto; the vLLM
              plugin registers ``vllm``)
``scoring``   windows, the baseline's and the Tucker model's scores, per-layer errors
``cache``     the baseline cache
``tasks``     the JSONL multiple-choice scorer (lm-eval's conventions) and lm-eval tasks
``report``    the report and its plot
"""

from tuckerize.evaluate.report import plot_report
from tuckerize.evaluate.run import evaluate
from tuckerize.evaluate.runtimes import EvalModel, register_runtime

__all__ = ["evaluate", "plot_report", "EvalModel", "register_runtime"]

"""``eval --tasks`` through lm-eval-harness, offline, on a task defined by local files
(tests/eval/tasks/: a task YAML and its JSONL), against the project's own ``--tasks-jsonl``
scorer on the same items; and the JSONL scorer's requests against lm-eval's HFLM, request by
request (tokens and log-likelihoods), edge cases of its conventions included.

lm-eval is installed by ``make install`` (the eval extra); without it these tests skip,
except under CI (``CI`` set), where a missing lm-eval is a failure.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from tuckerize.demo import DEMO_DIR

TASKS = Path(__file__).parent / "tasks"
TASK_YAML = TASKS / "shakespeare_mc.yaml"
TASK_JSONL = TASKS / "shakespeare_mc.jsonl"

if os.environ.get("CI"):
    import lm_eval.models.huggingface  # noqa: F401  (CI installs it: a missing lm-eval fails)
else:
    pytest.importorskip("lm_eval.models.huggingface", reason="lm-eval not installed (make install brings it)")


def test_local_lm_eval_task_equals_the_jsonl_scorer(cli, demo_tuckers, tmp_path, monkeypatch):
    """The real CLI, run from another folder: the YAML's data path is taken relative to the YAML."""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "report.json"
    result = cli("eval", "--model", demo_tuckers["light"], "--baseline", "demo", "--seqlen", 64, "--max-windows", 1,
                 "--layer-tokens", 8, "--no-cache", "--tasks", TASK_YAML, "--tasks-jsonl", TASK_JSONL, "--json", out)
    assert result.exit_code == 0, result.stderr
    report = json.loads(out.read_text())
    rows = len(TASK_JSONL.read_text().splitlines())
    for side in ("baseline", "tucker"):
        theirs = report["lm_eval"][side]["tuckerize_shakespeare_mc"]
        ours = report["tasks_jsonl"]["shakespeare_mc"][side]
        assert ours["examples"] == rows
        assert (theirs["acc,none"], theirs["acc_norm,none"]) == (ours["acc"], ours["acc_norm"]), side
    # Labels are not all on the likeliest choice, nor all off it: the agreement is not 0 == 0 or 1 == 1.
    assert 0 < report["tasks_jsonl"]["shakespeare_mc"]["baseline"]["acc"] < 1


def test_jsonl_requests_are_lm_evals():
    """Our encoding and log-likelihood of (context, continuation) pairs equal HFLM's on the
    same transformers model: trailing whitespace moved, an empty context (the prefix token),
    a continuation without a leading space, and a context longer than the model's 512
    positions (left-truncated)."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tuckerize.checkpoint import load_config
    from tuckerize.evaluate.runtimes import EvalModel
    from tuckerize.evaluate.tasks import encode_pair, loglikelihood, max_length

    tokenizer = AutoTokenizer.from_pretrained(str(DEMO_DIR))
    model = AutoModelForCausalLM.from_pretrained(str(DEMO_DIR), dtype=torch.float32).eval()
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1)
    long_context = " ".join(["the king is dead, long live the king."] * 120)
    pairs = [("The king is ", "dead"), ("To be, or not to be,\n", " that is"), ("", " Enter the Duke."),
             ("My lord", ","), ("Enter", " Hamlet"), (long_context, " And so")]
    limit = max_length(load_config(DEMO_DIR), tokenizer)
    assert limit == 512 and len(tokenizer(long_context)["input_ids"]) > limit
    for context, continuation in pairs[:2] + pairs[3:]:
        assert encode_pair(tokenizer, context, continuation) == lm._encode_pair(context, continuation)
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    theirs = [ll for ll, _ in lm.loglikelihood(requests, disable_tqdm=True)]
    scored = EvalModel("demo", lambda ids: model(ids).logits, model, "hf", {})
    ours = [loglikelihood(scored, *encode_pair(tokenizer, c, x), "cpu", limit) for c, x in pairs]
    assert ours == pytest.approx(theirs, abs=1e-4)
    assert len(set(round(v, 3) for v in ours)) == len(pairs)

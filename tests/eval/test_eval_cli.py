"""``tuckerize eval`` from the command line: the printed table, the baseline cache, the
JSON report and plot, the JSONL multiple-choice scorer, and the one-line errors.

The command runs in this process (typer's CliRunner, stdout and stderr kept apart),
except one error case run as a real subprocess to see its whole stderr.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest
import torch

import model_refs as M
from tuckerize.demo import DEMO_DIR

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _error_line(result) -> str:
    """The command failed the documented way: exit 1, stderr one line ``error: ...``."""
    lines = [l for l in result.stderr.splitlines() if l.strip()]
    assert result.exit_code == 1, (result.exit_code, result.stderr, result.stdout)
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


# ------------------------------------------------------------------ demo: two rank settings, cache


def test_demo_two_rank_settings_and_baseline_cache(cli, demo_tuckers, tmp_path, eval_cache):
    common = ["--baseline", "demo", "--seqlen", 256, "--max-windows", 4, "--layer-tokens", 32]
    runs = {}
    for name, extra in (("heavy", []), ("light", []), ("light-nocache", ["--no-cache"])):
        model = demo_tuckers[name.split("-")[0]]
        out = tmp_path / f"{name}.json"
        result = cli("eval", "--model", model, *common, *extra, "--json", out)
        assert result.exit_code == 0, result.stderr
        report = json.loads(out.read_text())
        runs[name] = (" ".join((result.stderr + result.stdout).split()), report)  # rich wraps at the width
        if name == "heavy":
            assert len(list(eval_cache.glob("*.safetensors"))) == 1, "the first run caches its baseline"

    heavy, light, nocache = (runs[n][1] for n in ("heavy", "light", "light-nocache"))
    # The table printed: both perplexities, KL and top-1 agreement, as in the report.
    for name, (text, report) in runs.items():
        b, k, f = report["baseline_result"], report["tucker_result"], report["fidelity"]
        assert "original vs Tucker" in text
        assert f"{b['perplexity']:.3f}" in text and f"{k['perplexity']:.3f}" in text
        assert "KL(original || Tucker) per token" in text and f"{f['kl_mean']:.4f}" in text
        assert "top-1 agreement" in text and f"{f['top1_agreement']:.4f}" in text
        assert "4 windows of 256" in text and "1,020 tokens" in text
        assert ("(cached)" in text) == b["cached"], name
    # Cache: the second model reuses the first run's baseline; --no-cache recomputes it.
    assert not heavy["baseline_result"]["cached"]
    assert light["baseline_result"]["cached"]
    assert light["baseline_result"]["perplexity"] == heavy["baseline_result"]["perplexity"]
    assert not nocache["baseline_result"]["cached"]
    assert abs(nocache["baseline_result"]["perplexity"] / heavy["baseline_result"]["perplexity"] - 1) < 1e-6
    assert nocache["tucker_result"]["perplexity"] == pytest.approx(light["tucker_result"]["perplexity"], rel=1e-6)
    assert len(list(eval_cache.glob("*.safetensors"))) == 1
    # Lighter compression (16,112,56) is closer to the original than 8,64,32.
    base = heavy["baseline_result"]["perplexity"]
    assert abs(light["tucker_result"]["perplexity"] - base) < abs(heavy["tucker_result"]["perplexity"] - base)
    assert light["fidelity"]["kl_mean"] < heavy["fidelity"]["kl_mean"]
    assert light["fidelity"]["top1_agreement"] > heavy["fidelity"]["top1_agreement"]
    assert light["compression"]["experts_ratio"] > heavy["compression"]["experts_ratio"]
    assert heavy["fidelity"]["kl_mean"] > 0.05  # 8,64,32 is a real loss on the demo


def test_cache_is_keyed_by_windows(tiny_eval):
    from tuckerize.evaluate import evaluate

    kw = dict(text=str(tiny_eval["text"]), seqlen=32, layer_tokens=8)
    a = evaluate(str(tiny_eval["low"]), str(tiny_eval["src"]), max_windows=3, **kw)
    b = evaluate(str(tiny_eval["full"]), str(tiny_eval["src"]), max_windows=3, **kw)
    c = evaluate(str(tiny_eval["low"]), str(tiny_eval["src"]), max_windows=2, **kw)
    d = evaluate(str(tiny_eval["low"]), str(tiny_eval["src"]), max_windows=2, seqlen=16, text=kw["text"],
                 layer_tokens=8)
    assert [r["baseline_result"]["cached"] for r in (a, b, c, d)] == [False, True, False, False]


# ------------------------------------------------------------------ JSON report and plot


def test_json_report_and_plot(cli, tiny_eval, tmp_path):
    from transformers import AutoTokenizer

    out, png = tmp_path / "report.json", tmp_path / "report.png"
    result = cli("eval", "--model", tiny_eval["low"], "--baseline", tiny_eval["src"], "--text", tiny_eval["text"],
                 "--seqlen", 32, "--max-windows", 3, "--kl-topk", 16, "--layer-tokens", 8, "--json", out,
                 "--plot", png)
    assert result.exit_code == 0, result.stderr
    report = json.loads(out.read_text())
    raw = tiny_eval["text"].read_text()
    ids = AutoTokenizer.from_pretrained(str(tiny_eval["src"]))(raw, add_special_tokens=False)["input_ids"]
    s = report["settings"]
    assert (s["seqlen"], s["backend"], s["device"], s["dtype"], s["runtime"], s["world_size"], s["kl_topk"],
            s["layer_tokens"]) == (32, "cpu", "cpu", "float32", "native", 1, 16, 8)
    assert s["kl"].startswith("top-16 of 64")
    t = report["text"]
    import hashlib

    assert t["source"] == str(tiny_eval["text"]) and t["sha256"] == hashlib.sha256(raw.encode()).hexdigest()
    assert (t["tokens_in_text"], t["windows"], t["tokens_scored"]) == (len(ids), 3, 3 * 31)
    assert report["tokens_used"] == ids[:64]
    assert report["model"] == str(tiny_eval["low"]) and report["baseline"] == str(tiny_eval["src"])
    assert set(report["fidelity"]["layer_relative_error"]) == {"0", "1"}
    assert report["compression"]["experts_ratio"] < 1
    b = report["compression_bytes"]
    assert 0 < b["experts_stored"] < b["experts_dense_bf16"]
    mem = report["memory"]["experts_per_layer_bytes"]  # float32 factors and cores as loaded, from the model
    from tuckerize.format import TuckerCheckpoint

    ckpt = TuckerCheckpoint.open(tiny_eval["low"])
    factor_values = [sum(ckpt.tensors.get(n).numel() for n in ckpt.tensors.keys() if f"layers.{L}." in n
                         and n.rsplit(".", 1)[-1] in ("U_E", "U_H", "U_I", "core")) for L in (0, 1)]
    assert mem["factors"] == 4 * sum(factor_values) / 2
    assert 0 < mem["total"] < mem["dense_same_dtype"] and mem["layers"] == 2
    data = png.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 2000


# ------------------------------------------------------------------ JSONL multiple choice


def _jsonl_rows(n: int, seed: int, shuffled: bool) -> list[dict]:
    """From the demo's held-out text: context = a line; choices = the true next line and
    three others (``shuffled``: three other orders of the next line's words); label = the
    true one's index."""
    lines = (DEMO_DIR / "heldout.txt").read_text().splitlines()
    pairs = [(lines[i], lines[i + 1]) for i in range(len(lines) - 1)
             if len(lines[i].strip()) >= 20 and len(lines[i + 1].split()) >= 5]
    pool = [b for _, b in pairs]
    rng = random.Random(seed)
    rows = []
    for ctx, nxt in rng.sample(pairs, n):
        if shuffled:
            choices = [nxt]
            while len(choices) < 4:
                words = nxt.split(" ")
                rng.shuffle(words)
                if " ".join(words) not in choices:
                    choices.append(" ".join(words))
        else:
            others = [d for d in pool if d != nxt and abs(len(d) - len(nxt)) <= 0.2 * len(nxt)]
            choices = rng.sample(others, 3) + [nxt]
        rng.shuffle(choices)
        rows.append({"context": ctx + "\n", "choices": choices, "label": choices.index(nxt)})
    return rows


@torch.no_grad()
def _reference_choice_scores(model, tokenizer, row: dict) -> list[float]:
    """Summed log-probability of each choice after the context (transformers), as lm-eval
    scores a multiple-choice request (written out here: continuation " " + choice, the
    context's trailing whitespace moved to it, the pair encoded whole and split after the
    context's own encoding; the demo tokenizers add no special tokens)."""
    context = row["context"].rstrip()
    scores = []
    for choice in row["choices"]:
        cont = row["context"][len(context):] + " " + choice
        ids = tokenizer(context + cont)["input_ids"]
        n_ctx = len(tokenizer(context)["input_ids"])
        logp = model(torch.tensor([ids])).logits[0].double().log_softmax(-1)
        scores.append(sum(float(logp[j - 1, ids[j]]) for j in range(n_ctx, len(ids))))
    return scores


def test_jsonl_multiple_choice(cli, demo_tuckers, tmp_path):
    from transformers import AutoTokenizer

    files = {"next_line": _jsonl_rows(16, seed=1, shuffled=False), "word_order": _jsonl_rows(16, seed=2, shuffled=True)}
    for name, rows in files.items():
        (tmp_path / f"{name}.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "report.json"
    result = cli("eval", "--model", demo_tuckers["light"], "--baseline", "demo", "--seqlen", 64, "--max-windows", 1,
                 "--layer-tokens", 8, "--no-cache", "--tasks-jsonl", tmp_path / "next_line.jsonl",
                 "--tasks-jsonl", tmp_path / "word_order.jsonl", "--json", out)
    assert result.exit_code == 0, result.stderr
    report = json.loads(out.read_text())["tasks_jsonl"]
    assert set(report) == set(files)
    assert "word_order acc" in result.stderr + result.stdout

    tokenizer = AutoTokenizer.from_pretrained(str(DEMO_DIR))
    hf = M.load_hf_reference(DEMO_DIR)
    for name, rows in files.items():
        acc = acc_norm = 0
        for row in rows:
            scores = _reference_choice_scores(hf, tokenizer, row)
            ranked = sorted(scores)
            assert ranked[-1] - ranked[-2] > 1e-3, "near-tie: the comparison below would be fragile"
            norms = [s / len(c) for s, c in zip(scores, row["choices"])]
            acc += int(max(range(4), key=scores.__getitem__) == row["label"])
            acc_norm += int(max(range(4), key=norms.__getitem__) == row["label"])
        got = report[name]["baseline"]
        assert got["examples"] == len(rows)
        assert got["acc"] == acc / len(rows), name
        assert got["acc_norm"] == acc_norm / len(rows), name
        assert 0 <= report[name]["tucker"]["acc"] <= 1 and report[name]["tucker"]["examples"] == len(rows)
    # Word order is easy for the demo (chance 0.25); the next line among other lines is
    # close to chance for a 2.8M-parameter model, so only the scorer's agreement is checked there.
    assert report["word_order"]["baseline"]["acc"] >= 0.75
    assert report["word_order"]["tucker"]["acc"] >= 0.5


def test_jsonl_one_example_follows_its_label(cli, tiny_eval, tmp_path):
    """A one-example file is scored 1 with the label on the independently best choice and
    0 with it on the worst."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_eval["src"]))
    row = {"context": "When shall we three meet again", "choices": ["?", " in rain", " and sun", "ly"]}
    scores = _reference_choice_scores(M.load_hf_reference(tiny_eval["src"]), tokenizer, {**row, "label": 0})
    best, worst = max(range(4), key=scores.__getitem__), min(range(4), key=scores.__getitem__)
    assert best != worst
    accs = []
    for label in (best, worst):
        task = tmp_path / f"one{label}.jsonl"
        task.write_text(json.dumps({**row, "label": label}) + "\n")
        out = tmp_path / f"r{label}.json"
        result = cli("eval", "--model", tiny_eval["low"], "--baseline", tiny_eval["src"], "--text", tiny_eval["text"],
                     "--seqlen", 32, "--max-windows", 1, "--layer-tokens", 4, "--tasks-jsonl", task, "--json", out)
        assert result.exit_code == 0, result.stderr
        accs.append(json.loads(out.read_text())["tasks_jsonl"][task.stem]["baseline"]["acc"])
    assert accs == [1.0, 0.0]


# ------------------------------------------------------------------ errors


@pytest.fixture
def deepseek_tucker(tucker_factory):
    return tucker_factory("deepseek_v3")


def test_error_missing_model_folder(cli, tiny_eval, tmp_path):
    line = _error_line(cli("eval", "--model", tmp_path / "nowhere", "--baseline", tiny_eval["src"]))
    assert "nowhere" in line and "does not exist" in line


def test_error_npu_without_torch_npu(cli, tiny_eval):
    try:
        import torch_npu  # noqa: F401
        pytest.skip("torch_npu is installed here")
    except ImportError:
        pass
    line = _error_line(cli("eval", "--model", tiny_eval["low"], "--baseline", tiny_eval["src"], "--text",
                           tiny_eval["text"], "--backend", "npu"))
    assert "torch_npu" in line


def test_error_cuda_without_cuda(cli, tiny_eval):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    line = _error_line(cli("eval", "--model", tiny_eval["low"], "--baseline", tiny_eval["src"], "--text",
                           tiny_eval["text"], "--backend", "cuda"))
    assert "CUDA is not available" in line and "--backend cpu" in line


def test_error_text_missing(cli, tiny_eval, tmp_path):
    line = _error_line(cli("eval", "--model", tiny_eval["low"], "--baseline", tiny_eval["src"], "--text",
                           tmp_path / "missing.txt"))
    assert "missing.txt" in line


def test_error_native_runtime_for_deepseek(cli, deepseek_tucker, tiny_eval):
    src, tucker = deepseek_tucker
    line = _error_line(cli("eval", "--model", tucker, "--baseline", src, "--text", tiny_eval["text"], "--seqlen", 16,
                           "--max-windows", 1, "--runtime", "native"))
    assert "native runtime does not cover DeepseekV3ForCausalLM" in line and "--runtime hf" in line


def test_error_text_shorter_than_one_window_real_process(tiny_eval, tmp_path):
    """A real process: its whole stderr is the one error line (no progress bars, no
    warnings, no traceback)."""
    short = tmp_path / "short.txt"
    short.write_text("Fair is foul.")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TUCKERIZE_CACHE": str(tmp_path / "cache")}
    env.pop("TUCKERIZE_DEBUG", None)
    proc = subprocess.run([sys.executable, "-m", "tuckerize", "eval", "--model", str(tiny_eval["low"]),
                           "--baseline", str(tiny_eval["src"]), "--text", str(short), "--seqlen", "32"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 1, proc.stderr
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "13 tokens" in lines[0] and "--seqlen 32" in lines[0]
    assert proc.stdout == ""

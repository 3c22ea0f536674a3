"""Resolve the plugin's uses of vLLM (:mod:`.api_uses`) in one release's sources, without importing them.

:class:`SourceTree` reads a release's Python files from its wheel (or an installed folder)
and parses them with :mod:`ast`; :func:`check_use` follows one use step by step: a name
through vLLM's imports, re-exports, star imports and aliases to its definition; an
attribute to a class's field, property, method or an attribute its methods assign to
``self`` (through the class's bases); a call against the parameters of the function or
constructor (positional count, keywords, required parameters); a call's result by the
function's return annotation; an element by the container's annotation. A value typed
``X | Y`` must support the rest of the path as either. The walk ends, successfully, where
the path leaves vLLM (a torch, transformers or builtin type, ``Any``).

:func:`check_model` checks an architecture entry of the plugin: the model module and class
exist, the class's constructor takes ``vllm_config=`` and ``prefix=``, the MoE block the
plugin rebinds is a global of that module, constructed there with ``prefix=`` as a keyword,
and which of the block's attributes the module's constructors read.
"""

from __future__ import annotations

import ast
import base64
import builtins
import hashlib
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from tuckerize.integrations.vllm.api_uses import steps

CONTAINERS = {"list": 0, "List": 0, "Sequence": 0, "MutableSequence": 0, "Iterable": 0, "Iterator": 0,
              "tuple": 0, "Tuple": 0, "set": 0, "Set": 0, "frozenset": 0, "view": 0,
              "dict": 1, "Dict": 1, "Mapping": 1, "MutableMapping": 1, "defaultdict": 1, "OrderedDict": 1}
DICT_METHODS = {"keys": 0, "values": 1, "get": 1}


@dataclass(eq=False)
class Obj:
    """What a path step denotes: ``kind`` is module, class, func, instance, generic, union,
    external (outside vLLM: the check stops there, successfully) or unknown (stops: not checked)."""

    kind: str
    module: str = ""
    name: str = ""
    node: Any = None
    args: tuple = ()
    owner: "Obj | None" = None
    bound: bool = False


def external(name: str) -> Obj:
    return Obj("external", name=name)


def unknown(why: str) -> Obj:
    return Obj("unknown", name=why)


class Problem(Exception):
    """A use that the release does not support (a missing name, a call it does not accept)."""


class SourceTree:
    """A release's ``vllm/**/*.py``, parsed on demand; ``read`` returns a file's bytes or None."""

    def __init__(self, read: Callable[[str], bytes | None], hashes: dict[str, str] | None = None):
        self._read, self.hashes = read, hashes or {}
        self._modules: dict[str, tuple[str, ast.Module] | None] = {}
        self._symbols: dict[str, tuple[dict[str, tuple], list[str]]] = {}
        self.used: dict[str, str] = {}

    @classmethod
    def from_wheel(cls, path: str | Path) -> "SourceTree":
        whl = zipfile.ZipFile(path)
        names = set(whl.namelist())
        record = next((n for n in names if n.endswith(".dist-info/RECORD")), None)
        hashes = {}
        for line in (whl.read(record).decode().splitlines() if record else []):
            name, digest, _ = (line.rsplit(",", 2) + ["", ""])[:3]
            if digest.startswith("sha256="):
                raw = base64.urlsafe_b64decode(digest[7:] + "=" * (-len(digest[7:]) % 4))
                hashes[name] = raw.hex()
        return cls(lambda rel: whl.read(rel) if rel in names else None, hashes)

    @classmethod
    def from_folder(cls, site: str | Path) -> "SourceTree":
        site = Path(site)
        return cls(lambda rel: (site / rel).read_bytes() if (site / rel).is_file() else None)

    def module(self, name: str) -> tuple[str, ast.Module] | None:
        """``(file, tree)`` of vLLM module ``name``, None when the release has no such module."""
        if name not in self._modules:
            base = name.replace(".", "/")
            self._modules[name] = None
            for rel in (f"{base}.py", f"{base}/__init__.py"):
                data = self._read(rel)
                if data is not None:
                    self.used[rel] = self.hashes.get(rel) or hashlib.sha256(data).hexdigest()
                    self._modules[name] = (rel, ast.parse(data))
                    break
        return self._modules[name]

    def symbols(self, name: str) -> tuple[dict[str, tuple], list[str]]:
        """Module-level names of ``name`` (definitions, imports, assignments) and its star imports."""
        if name not in self._symbols:
            found = self.module(name)
            table: dict[str, tuple] = {}
            stars: list[str] = []
            if found is not None:
                rel, tree = found
                package = name if rel.endswith("__init__.py") else name.rpartition(".")[0]
                _collect(tree.body, name, package, table, stars)
            self._symbols[name] = (table, stars)
        return self._symbols[name]

    def where(self, obj: Obj) -> str:
        found = self.module(obj.module) if obj.module else None
        line = getattr(obj.node, "lineno", None)
        return f"{found[0]}:{line}" if found and line else (found[0] if found else obj.module)


def _collect(body: list[ast.stmt], module: str, package: str, table: dict, stars: list) -> None:
    for node in body:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            table[node.name] = ("class" if isinstance(node, ast.ClassDef) else "func", node)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                source = f"{base}.{node.module}" if node.module else base
            else:
                source = node.module or ""
            for alias in node.names:
                if alias.name == "*":
                    stars.append(source)
                else:
                    table[alias.asname or alias.name] = ("from", source, alias.name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname:
                    table[alias.asname] = ("import", alias.name)
                else:
                    head = alias.name.split(".")[0]
                    table[head] = ("import", head)
        elif isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            table[node.targets[0].id] = ("expr", node.value, node)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            table[node.target.id] = ("annot", node.annotation, node)
        elif isinstance(node, (ast.If, ast.Try, ast.With)):
            for block in ("body", "orelse", "finalbody"):
                _collect(getattr(node, block, []), module, package, table, stars)
            for handler in getattr(node, "handlers", []):
                _collect(handler.body, module, package, table, stars)


def is_vllm(module: str) -> bool:
    return module == "vllm" or module.startswith("vllm.")


@dataclass
class Resolver:
    """Static name, attribute, call and element resolution over one :class:`SourceTree`."""

    tree: SourceTree
    defs: list[dict[str, Any]] = field(default_factory=list)

    # -- names -------------------------------------------------------------------------------
    def lookup(self, module: str, name: str, depth: int = 0) -> Obj | None:
        if depth > 30:
            return unknown(f"import loop at {module}.{name}")
        table, stars = self.tree.symbols(module)
        entry = table.get(name)
        if entry is None:
            if self.tree.module(f"{module}.{name}") is not None:
                return Obj("module", module=f"{module}.{name}")
            for star in stars:
                found = self.lookup(star, name, depth + 1) if is_vllm(star) else None
                if found is not None:
                    return found
            if hasattr(builtins, name) and self.tree.module(module) is not None:
                return external(f"builtins.{name}")
            return None
        kind = entry[0]
        if kind in ("class", "func"):
            return Obj(kind, module=module, name=name, node=entry[1])
        if kind == "import":
            return Obj("module", module=entry[1]) if is_vllm(entry[1]) else external(entry[1])
        if kind == "from":
            source, original = entry[1], entry[2]
            if not is_vllm(source):
                return external(f"{source}.{original}")
            found = self.lookup(source, original, depth + 1)
            if found is None and self.tree.module(f"{source}.{original}") is not None:
                return Obj("module", module=f"{source}.{original}")
            if found is None:
                raise Problem(f"{module} imports {original} from {source}, which has no such name")
            return found
        if kind == "annot":
            return self.annot(module, entry[1])
        return Obj("expr", module=module, name=name, node=entry[1])

    def value(self, module: str, node: ast.AST) -> Obj:
        """The object an expression in ``module`` denotes."""
        if isinstance(node, ast.Name):
            found = self.lookup(module, node.id)
            if found is None:
                return unknown(f"{node.id} is not defined in {module}")
            return self.value(found.module, found.node) if found.kind == "expr" else found
        if isinstance(node, ast.Attribute):
            return self.member(self.value(module, node.value), node.attr)
        if isinstance(node, ast.Call):
            func = self.value(module, node.func)
            if func.kind == "class":
                return Obj("instance", module=func.module, name=func.name, node=func.node)
            if func.kind == "func":
                return self.returns(func)
            return unknown(f"the result of {ast.unparse(node)[:60]}")
        if isinstance(node, ast.Subscript):
            return self.value(module, node.value)
        if isinstance(node, ast.Constant):
            return external(type(node.value).__name__)
        return unknown(f"{ast.unparse(node)[:60]}")

    def annot(self, module: str, node: ast.AST | None, owner: Obj | None = None) -> Obj:
        """The type an annotation in ``module`` denotes (instances, containers, unions)."""
        if node is None:
            return unknown("no annotation")
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            if node.value == "Self" and owner is not None:
                return Obj("instance", module=owner.module, name=owner.name, node=owner.node)
            return self.annot(module, ast.parse(node.value, mode="eval").body, owner)
        if isinstance(node, ast.Constant) and node.value is None:
            return external("None")
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
            return self._union([self.annot(module, node.left, owner), self.annot(module, node.right, owner)])
        if isinstance(node, ast.Subscript):
            origin = self.value(module, node.value)
            items = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
            short = origin.name.rsplit(".", 1)[-1]
            if short in ("Optional", "Union"):
                return self._union([self.annot(module, i, owner) for i in items])
            if short in CONTAINERS and origin.kind == "external":
                return Obj("generic", name=short, args=tuple(self.annot(module, i, owner) for i in items))
            return self.annot(module, node.value, owner)
        if isinstance(node, ast.Name) and node.id == "Self" and owner is not None:
            return Obj("instance", module=owner.module, name=owner.name, node=owner.node)
        if isinstance(node, (ast.Name, ast.Attribute)):
            if isinstance(node, ast.Name):
                found = self.lookup(module, node.id)
                if found is not None and found.kind == "expr":
                    return self.annot(found.module, found.node, owner)
            target = self.value(module, node)
            if target.kind == "class":
                return Obj("instance", module=target.module, name=target.name, node=target.node)
            if target.kind in ("external", "generic", "union", "instance"):
                return target
            return unknown(f"annotation {ast.unparse(node)}")
        return unknown(f"annotation {ast.unparse(node)[:60]}")

    def _union(self, options: list[Obj]) -> Obj:
        flat = []
        for o in options:
            flat.extend(o.args if o.kind == "union" else [o])
        flat = [o for o in flat if not (o.kind == "external" and o.name == "None")]
        return flat[0] if len(flat) == 1 else Obj("union", args=tuple(flat))

    # -- classes -----------------------------------------------------------------------------
    def mro(self, cls: Obj) -> tuple[list[Obj], list[str]]:
        """vLLM classes of ``cls``'s bases, depth first (``cls`` first), and its bases outside vLLM."""
        out, outside, todo = [], [], [cls]
        while todo:
            c = todo.pop(0)
            if any(c.node is o.node for o in out):
                continue
            out.append(c)
            for base in c.node.bases:
                b = self.value(c.module, base)
                if b.kind == "class":
                    todo.append(b)
                else:
                    outside.append(b.name or ast.unparse(base))
        return out, outside

    def _record(self, obj: Obj, qualname: str, args: ast.arguments | None, returns: ast.AST | None) -> dict:
        sig = None if args is None else f"({ast.unparse(args)})" + (f" -> {ast.unparse(returns)}" if returns else "")
        entry = {"name": f"{obj.module}:{qualname}", "at": self.tree.where(obj), "kind": obj.kind}
        if sig is not None:
            entry["signature"] = sig
            entry["params"] = [a.arg for a in [*args.posonlyargs, *args.args]] + \
                ([f"*{args.vararg.arg}"] if args.vararg else []) + [a.arg for a in args.kwonlyargs] + \
                ([f"**{args.kwarg.arg}"] if args.kwarg else [])
        if entry not in self.defs:
            self.defs.append(entry)
        return entry

    def member(self, obj: Obj, attr: str) -> Obj:
        if obj.kind == "module":
            found = self.lookup(obj.module, attr)
            if found is None:
                raise Problem(f"module {obj.module} has no {attr}")
            if found.kind in ("class", "func"):
                self._record(found, found.name, found.node.args if found.kind == "func" else None,
                             found.node.returns if found.kind == "func" else None)
            return self.value(found.module, found.node) if found.kind == "expr" else found
        if obj.kind in ("class", "instance"):
            return self._class_member(obj, attr)
        if obj.kind == "union":
            return self._union([self.member(o, attr) for o in obj.args])
        if obj.kind == "generic" and obj.name in ("dict", "Dict", "Mapping", "MutableMapping") and attr in DICT_METHODS:
            return Obj("func", name=f"dict.{attr}", args=(Obj("generic", name="view", args=(obj.args[DICT_METHODS[attr]],)),))
        if obj.kind == "generic":
            return external(f"{obj.name}.{attr}")
        return obj

    def _class_member(self, obj: Obj, attr: str) -> Obj:
        classes, outside = self.mro(Obj("class", module=obj.module, name=obj.name, node=obj.node))
        instance = obj.kind == "instance"
        for cls in classes:
            for stmt in cls.node.body:
                if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)) and stmt.name == attr:
                    decorators = {ast.unparse(d) for d in stmt.decorator_list}
                    bound = "classmethod" in decorators or (instance and "staticmethod" not in decorators)
                    func = Obj("func", module=cls.module, name=f"{cls.name}.{attr}", node=stmt, owner=cls,
                               bound=bound)
                    self._record(func, func.name, stmt.args, stmt.returns)
                    if instance and decorators & {"property", "cached_property", "functools.cached_property"}:
                        return self.annot(cls.module, stmt.returns, cls)
                    return func
                if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and stmt.target.id == attr:
                    self._record(Obj("field", module=cls.module, node=stmt), f"{cls.name}.{attr}", None, None)
                    return self.annot(cls.module, stmt.annotation, cls)
                if isinstance(stmt, ast.Assign) and any(isinstance(t, ast.Name) and t.id == attr for t in stmt.targets):
                    return self.value(cls.module, stmt.value)
                if isinstance(stmt, ast.ClassDef) and stmt.name == attr:
                    return Obj("class", module=cls.module, name=f"{cls.name}.{attr}", node=stmt)
        if instance:
            for cls in classes:
                found = self._self_attribute(cls, attr)
                if found is not None:
                    return found
        if outside:
            return external(f"{attr} of {', '.join(outside)}")
        raise Problem(f"{obj.module}.{obj.name} has no attribute {attr}")

    def _self_attribute(self, cls: Obj, attr: str) -> Obj | None:
        """``self.<attr>`` as the class's methods assign it: by annotation, else by the value's type."""
        assigned = None
        for method in (s for s in cls.node.body if isinstance(s, (ast.FunctionDef, ast.AsyncFunctionDef))):
            for node in ast.walk(method):
                target = node.target if isinstance(node, ast.AnnAssign) else \
                    node.targets[0] if isinstance(node, ast.Assign) and len(node.targets) == 1 else None
                if not (isinstance(target, ast.Attribute) and target.attr == attr and
                        isinstance(target.value, ast.Name) and target.value.id == "self"):
                    continue
                self._record(Obj("attribute", module=cls.module, node=node), f"{cls.name}.{attr}", None, None)
                if isinstance(node, ast.AnnAssign):
                    return self.annot(cls.module, node.annotation, cls)
                if assigned is None:
                    params = {a.arg: a for a in [*method.args.posonlyargs, *method.args.args, *method.args.kwonlyargs]}
                    if isinstance(node.value, ast.Name) and node.value.id in params:  # self.x = x
                        assigned = self.annot(cls.module, params[node.value.id].annotation, cls)
                    else:
                        assigned = self.value(cls.module, node.value)
        return assigned

    # -- calls and elements ------------------------------------------------------------------
    def returns(self, func: Obj) -> Obj:
        if func.node is None:  # a builtin container method
            return func.args[0] if func.args else unknown(func.name)
        return self.annot(func.module, func.node.returns, func.owner)

    def call(self, obj: Obj, step: str) -> Obj:
        npos_text, _, keys_text = step[1:-1].partition(";")
        npos, keys = int(npos_text), [k for k in keys_text.split(",") if k]
        if obj.kind == "union":
            return self._union([self.call(o, step) for o in obj.args])
        if obj.kind == "func":
            if obj.node is not None:
                check_arguments(obj.node.args, npos, keys, skip_first=obj.bound, what=f"{obj.module}.{obj.name}")
            return self.returns(obj)
        if obj.kind == "class":
            self._check_constructor(obj, npos, keys)
            return Obj("instance", module=obj.module, name=obj.name, node=obj.node)
        if obj.kind == "instance":
            return self.call(self._class_member(obj, "__call__"), step)
        return obj

    def _check_constructor(self, cls: Obj, npos: int, keys: list[str]) -> None:
        classes, outside = self.mro(cls)
        for c in classes:
            init = next((s for s in c.node.body if isinstance(s, ast.FunctionDef) and s.name == "__init__"), None)
            if init is not None:
                self._record(Obj("func", module=c.module, node=init), f"{c.name}.__init__", init.args, None)
                check_arguments(init.args, npos, keys, skip_first=True, what=f"{cls.module}.{cls.name}")
                return
        fields = {s.target.id for c in classes for s in c.node.body
                  if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)
                  and "ClassVar" not in ast.unparse(s.annotation)}
        if not fields and outside:
            return  # built by a base outside vLLM: nothing of vLLM's to check
        bad = [k for k in keys if k not in ("*", "**") and k not in fields]
        if bad or npos:
            raise Problem(f"{cls.module}.{cls.name} (fields {', '.join(sorted(fields))}) does not take "
                          f"{npos} positional arguments / keywords {', '.join(bad)}")

    def element(self, obj: Obj) -> Obj:
        if obj.kind == "union":
            return self._union([self.element(o) for o in obj.args])
        if obj.kind == "generic":
            index = CONTAINERS.get(obj.name, 0)
            return obj.args[index] if len(obj.args) > index else unknown(f"an element of {obj.name}")
        if obj.kind == "instance":
            for name in ("__iter__", "__getitem__"):
                try:
                    method = self._class_member(obj, name)
                except Problem:
                    continue
                if method.kind == "func" and method.node is not None and method.node.returns is not None:
                    result = self.returns(method)
                    return self.element(result) if name == "__iter__" else result
            return unknown(f"an element of {obj.name}")
        return obj


def check_arguments(args: ast.arguments, npos: int, keys: list[str], *, skip_first: bool, what: str) -> None:
    """Raise :class:`Problem` unless a call with ``npos`` positional arguments and keywords
    ``keys`` (``*``/``**``: splats, which may fill the rest) binds to ``args``."""
    positional = [*args.posonlyargs, *args.args][1 if skip_first else 0:]
    n_posonly = max(0, len(args.posonlyargs) - (1 if skip_first else 0))
    named = [a.arg for a in positional[n_posonly:]] + [a.arg for a in args.kwonlyargs]
    splat_pos, splat_kw = "*" in keys, "**" in keys
    keys = [k for k in keys if k not in ("*", "**")]
    problems = []
    if npos > len(positional) and args.vararg is None:
        problems.append(f"takes {len(positional)} positional arguments, the plugin passes {npos}")
    for k in keys:
        if k not in named and args.kwarg is None:
            problems.append(f"has no parameter {k}")
        elif k in [a.arg for a in positional[:npos]]:
            problems.append(f"gets {k} twice")
    n_defaults = len(args.defaults)
    required = [a.arg for i, a in enumerate(positional) if i < len(positional) - n_defaults]
    required += [a.arg for a, d in zip(args.kwonlyargs, args.kw_defaults) if d is None]
    covered = {a.arg for a in positional[:npos]} | set(keys)
    missing = [r for r in required if r not in covered]
    if missing and not (splat_pos or splat_kw):
        problems.append(f"needs {', '.join(missing)}")
    if problems:
        raise Problem(f"{what}({ast.unparse(args)}) " + "; ".join(problems))


def check_use(resolver: Resolver, use: str) -> dict[str, Any]:
    """``{"status": "ok" | "unresolved" | "problem", "note": ..., "defs": [...]}`` for one use."""
    resolver.defs = []
    parts = steps(use)
    root = parts[0]
    module, _, name = root.rstrip("@").partition(":")
    done = root
    try:
        if resolver.tree.module(module) is None:
            raise Problem(f"no module {module}")
        obj = resolver.member(Obj("module", module=module), name)
        if root.endswith("@"):
            if obj.kind != "class":
                raise Problem(f"{module}.{name} is not a class")
            obj = Obj("instance", module=obj.module, name=obj.name, node=obj.node)
        for step in parts[1:]:
            if obj.kind in ("external", "unknown"):
                break
            if step.startswith("."):
                obj = resolver.member(obj, step[1:])
            elif step.startswith("("):
                obj = resolver.call(obj, step)
            else:
                obj = resolver.element(obj)
            done += step
    except Problem as exc:
        return {"status": "problem", "note": f"{done}: {exc}", "defs": resolver.defs}
    result = {"status": "ok", "defs": resolver.defs}
    if obj.kind == "external" and done != use:
        result["note"] = f"leaves vLLM after {done} ({obj.name})"
    elif obj.kind == "unknown" and done != use:
        result = {"status": "unresolved", "note": f"{done}: {obj.name}", "defs": resolver.defs}
    return result


def _block_reads(tree: ast.Module, block: str) -> list[str]:
    """Attributes the module's constructors read from a value they checked with
    ``isinstance(value, <block>)`` (directly, or through a name bound to that value)."""
    reads = set()
    for func in ast.walk(tree):
        if not (isinstance(func, ast.FunctionDef) and func.name == "__init__"):
            continue
        checked = {ast.dump(node.args[0]) for node in ast.walk(func)
                   if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "isinstance"
                   and len(node.args) == 2 and isinstance(node.args[1], ast.Name) and node.args[1].id == block}
        for node in ast.walk(func):
            if isinstance(node, ast.Assign) and ast.dump(node.value) in checked:
                checked |= {ast.dump(ast.Name(id=t.id, ctx=ast.Load())) for t in node.targets if isinstance(t, ast.Name)}
        for node in ast.walk(func):
            if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load) and ast.dump(node.value) in checked:
                reads.add(node.attr)
    return sorted(reads)


def check_model(resolver: Resolver, use: str) -> dict[str, Any]:
    """Check one ``model module:Class [block=Block]`` use (see the module docstring). A release
    without the model module gives status ``unavailable`` (the plugin then refuses the
    architecture at load with a one-line error)."""
    resolver.defs = []
    spec, _, block = use[len("model "):].partition(" block=")
    module, _, cls_name = spec.partition(":")
    found = resolver.tree.module(module)
    if found is None:
        return {"status": "unavailable", "note": f"this release has no module {module}", "defs": []}
    result: dict[str, Any] = {"status": "ok", "defs": resolver.defs}
    try:
        cls = resolver.member(Obj("module", module=module), cls_name)
        if cls.kind != "class":
            raise Problem(f"{module}.{cls_name} is not a class")
        resolver.call(cls, "(0;prefix,vllm_config)")
        if block:
            table, _ = resolver.tree.symbols(module)
            if table.get(block, ("",))[0] not in ("class", "from"):
                raise Problem(f"{module} has no global class {block} to rebind")
            calls = [node for node in ast.walk(found[1]) if isinstance(node, ast.Call)
                     and isinstance(node.func, ast.Name) and node.func.id == block]
            if not calls:
                raise Problem(f"{module} never constructs {block}: rebinding it would not replace the MoE blocks")
            result["block_calls"] = sorted({f"{found[0]}:{c.lineno} {block}" + _call_text(c) for c in calls})
            bad = [c.lineno for c in calls if not any(k.arg == "prefix" for k in c.keywords)]
            if bad:
                raise Problem(f"{found[0]} constructs {block} without prefix= at line(s) {bad}; TuckerMoE reads its "
                              "layer from that keyword")
            result["block_reads"] = _block_reads(found[1], block)
    except Problem as exc:
        return {"status": "problem", "note": str(exc), "defs": resolver.defs}
    return result


def _call_text(node: ast.Call) -> str:
    parts = [ast.unparse(a) for a in node.args] + [f"{k.arg}=" if k.arg else "**" for k in node.keywords]
    return f"({', '.join(parts)})"


def check_release(tree: SourceTree, uses: list[str]) -> dict[str, dict[str, Any]]:
    """Every use checked against one release: ``{use: result}`` (see :func:`check_use`, :func:`check_model`)."""
    resolver = Resolver(tree)
    return {use: (check_model if use.startswith("model ") else check_use)(resolver, use) for use in uses}

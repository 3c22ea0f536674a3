"""Rank plans: which Tucker ranks (r_E, r_H, r_I) each layer and projection gets.

Either one triple for everything (``--ranks 64,512,256``) or a YAML file::

    ranks: [64, 512, 256]          # default for every MoE layer and projection
    projections:                   # optional per-projection defaults
      down: [64, 512, 384]
    layers:                        # optional per-layer overrides; keys: an index or "a-b"
      0: [128, 1024, 512]          # all projections of layer 0
      "40-47":
        gate: [32, 256, 128]
        up: [32, 256, 128]

More specific entries win: layer+projection, then layer, then projection, then default.
The same file may hold a ``method:`` section (how to decompose, not which ranks; read by
:mod:`tuckerize.compress.method`); a file with only that section gives no ranks.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from tuckerize.arch import PROJECTIONS
from tuckerize.errors import RankError

AXES = ("r_E", "r_H", "r_I")
AXIS_NAMES = ("number of experts", "hidden size", "intermediate size")

Ranks = tuple[int, int, int]


def parse_ranks(text: str | Any) -> Ranks:
    """Parse ``"64,512,256"`` or a 3-element list into a rank triple."""
    if isinstance(text, str):
        parts = [p.strip() for p in text.split(",")]
    elif isinstance(text, (list, tuple)):
        parts = list(text)
    else:
        raise RankError(f"ranks {text!r} are malformed; give three integers r_E,r_H,r_I such as 64,512,256")
    if len(parts) != 3:
        raise RankError(f"ranks {text!r} are malformed; give three integers r_E,r_H,r_I such as 64,512,256")
    out = []
    for axis, part in zip(AXES, parts):
        try:
            value = int(part)
            if isinstance(part, float) or (isinstance(part, str) and not re.fullmatch(r"\s*\d+\s*", part)):
                raise ValueError
        except (TypeError, ValueError):
            raise RankError(f"rank {axis}={part!r} is not a whole number; give ranks like 64,512,256") from None
        out.append(value)
    return (out[0], out[1], out[2])


def check_ranks(ranks: Ranks, shape: tuple[int, int, int], where: str = "") -> None:
    """Raise :class:`RankError` naming the axis when a rank is zero or above its dimension."""
    for axis, name, r, d in zip(AXES, AXIS_NAMES, ranks, shape):
        if r < 1 or r > d:
            loc = f" for {where}" if where else ""
            raise RankError(f"rank {axis}={r}{loc} is out of range: the {name} is {d}, so use 1..{d}")


def _layer_keys(key: Any) -> list[int]:
    text = str(key).strip()
    m = re.fullmatch(r"(\d+)\s*-\s*(\d+)", text)
    if m:
        lo, hi = int(m.group(1)), int(m.group(2))
        if hi < lo:
            raise RankError(f"layer range {text!r} in the rank config is empty; write it low-high")
        return list(range(lo, hi + 1))
    if re.fullmatch(r"\d+", text):
        return [int(text)]
    raise RankError(f"layer key {text!r} in the rank config is not an index or a range like 4-7")


@dataclass
class RankPlan:
    default: Ranks | None = None
    projections: dict[str, Ranks] = field(default_factory=dict)
    layers: dict[int, Ranks] = field(default_factory=dict)
    layer_projections: dict[tuple[int, str], Ranks] = field(default_factory=dict)
    source: str = "--ranks"

    @property
    def empty(self) -> bool:
        """No ranks at all (a config file with only a ``method:`` section)."""
        return self.default is None and not (self.projections or self.layers or self.layer_projections)

    def ranks_for(self, layer: int, projection: str) -> Ranks:
        for found in (
            self.layer_projections.get((layer, projection)),
            self.layers.get(layer),
            self.projections.get(projection),
            self.default,
        ):
            if found is not None:
                return found
        raise RankError(
            f"{self.source} gives no ranks for layer {layer} {projection}; add a default 'ranks:' entry"
        )

    def check(self, moe_layers: tuple[int, ...], shape: tuple[int, int, int]) -> None:
        """Validate every rank this plan would use, and layer keys that match no MoE layer."""
        named = set(self.layers) | {layer for layer, _ in self.layer_projections}
        stray = sorted(named - set(moe_layers))
        if stray:
            raise RankError(
                f"{self.source} names layer {stray[0]}, which is not a MoE layer; MoE layers are "
                f"{_ranges(moe_layers)}"
            )
        for layer in moe_layers:
            for proj in PROJECTIONS:
                check_ranks(self.ranks_for(layer, proj), shape, f"layer {layer} {proj}")

    def to_dict(self) -> dict[str, Any]:
        layers: dict[str, Any] = {}
        for layer, r in sorted(self.layers.items()):
            layers[str(layer)] = list(r)
        for (layer, proj), r in sorted(self.layer_projections.items()):
            entry = layers.setdefault(str(layer), {})
            if isinstance(entry, list):
                entry = {p: entry for p in PROJECTIONS}
                layers[str(layer)] = entry
            entry[proj] = list(r)
        out: dict[str, Any] = {}
        if self.default is not None:
            out["ranks"] = list(self.default)
        if self.projections:
            out["projections"] = {p: list(r) for p, r in self.projections.items()}
        if layers:
            out["layers"] = layers
        return out


def _ranges(layers: tuple[int, ...]) -> str:
    if not layers:
        return "none"
    if list(layers) == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}-{layers[-1]}"
    return ",".join(map(str, layers))


def plan_from_dict(data: Mapping[str, Any], source: str) -> RankPlan:
    if not isinstance(data, Mapping):
        raise RankError(f"{source} must be a mapping with a 'ranks:' entry")
    unknown = set(data) - {"ranks", "projections", "layers", "description", "model", "method"}
    if unknown:
        raise RankError(f"{source} has unknown key {sorted(unknown)[0]!r}; allowed: ranks, projections, layers, method")
    plan = RankPlan(source=source)
    if data.get("ranks") is not None:
        plan.default = parse_ranks(data["ranks"])
    for proj, r in (data.get("projections") or {}).items():
        if proj not in PROJECTIONS:
            raise RankError(f"{source}: projection {proj!r} is not one of {', '.join(PROJECTIONS)}")
        plan.projections[proj] = parse_ranks(r)
    for key, value in (data.get("layers") or {}).items():
        for layer in _layer_keys(key):
            if isinstance(value, Mapping):
                for proj, r in value.items():
                    if proj not in PROJECTIONS:
                        raise RankError(
                            f"{source}: projection {proj!r} in layer {key} is not one of {', '.join(PROJECTIONS)}"
                        )
                    plan.layer_projections[(layer, proj)] = parse_ranks(r)
            else:
                plan.layers[layer] = parse_ranks(value)
    return plan


def read_yaml(path: str | Path) -> Any:
    """A rank config's YAML, parsed; a missing or invalid file is a one-line :class:`RankError`."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise RankError(f"rank config {path} does not exist; pass a YAML file such as configs/qwen3-30b-a3b.yaml")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        line = getattr(getattr(exc, "problem_mark", None), "line", None)
        where = f" at line {line + 1}" if line is not None else ""
        raise RankError(f"rank config {path} is not valid YAML{where}; fix the file") from None


def load_plan(path: str | Path) -> RankPlan:
    return plan_from_dict(read_yaml(path) or {}, str(path))


def plan_text(plan: RankPlan, header: str = "") -> str:
    """The YAML of a rank plan (inline triples), each ``header`` line as a comment above it."""
    import yaml

    return "".join(f"# {line}\n" for line in header.splitlines()) + yaml.safe_dump(
        plan.to_dict(), sort_keys=False, default_flow_style=None)


def save_plan(plan: RankPlan, path: str | Path, header: str = "") -> None:
    """Write :func:`plan_text` to ``path`` atomically (creating its folder)."""
    from tuckerize.checkpoint import output_errors, write_text

    path = Path(path)
    with output_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, plan_text(plan, header))


def uniform_plan(ranks: Ranks | str) -> RankPlan:
    return RankPlan(default=parse_ranks(ranks) if isinstance(ranks, str) else tuple(ranks))  # type: ignore[arg-type]

"""The model being decomposed: where it is, its MoE shape, and how its tensors map to output files.

:class:`SourceModel` resolves the model (local folder or hub id), reads its config and
opens its safetensors lazily. Output units: unit 0 holds every tensor outside decoder
layers, unit L+1 decoder layer L (its non-expert tensors plus, for a MoE layer, the
factors that replace its routed experts).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tuckerize.arch import MoESpec, moe_spec
from tuckerize.checkpoint import Checkpoint, ModelSource, layer_of, load_config, resolve_model, sha256_file
from tuckerize.experts import expert_tensor_names
from tuckerize.format import unit_file
from tuckerize.progress import Progress


@dataclass
class SourceModel:
    source: ModelSource
    config: dict[str, Any]
    spec: MoESpec
    ckpt: Checkpoint
    units_of: dict[int, list[str]]  # unit -> names of the source tensors it keeps
    n_units: int
    replaced: frozenset[str] = frozenset()  # routed-expert tensors (and their FP8 scales) replaced by factors

    @classmethod
    def open(cls, model: str, revision: str | None = None) -> "SourceModel":
        source = resolve_model(model, revision)
        config = load_config(source.path)
        spec = moe_spec(config)
        ckpt = Checkpoint.open(source.path)
        replaced = {n for layer in spec.moe_layers for n in expert_tensor_names(ckpt, spec, layer)}
        units_of: dict[int, list[str]] = {}
        for name in ckpt.keys():
            if name in replaced:
                continue
            layer = layer_of(name)
            units_of.setdefault(0 if layer is None else layer + 1, []).append(name)
        n_units = max([spec.num_layers] + list(units_of)) + 1
        for layer in spec.moe_layers:
            units_of.setdefault(layer + 1, [])
        return cls(source, config, spec, ckpt, units_of, n_units, frozenset(replaced))

    @property
    def hidden_act(self) -> str:
        return self.config.get("hidden_act", "silu")

    @property
    def n_tensors(self) -> int:
        """Stacked expert tensors decomposed: MoE layers x projections."""
        from tuckerize.arch import PROJECTIONS

        return len(self.spec.moe_layers) * len(PROJECTIONS)

    def unit_file(self, unit: int) -> str:
        return unit_file(unit, self.n_units)

    def units(self) -> list[tuple[str, int | None]]:
        """(file, decoder layer or None) of every output unit, in order."""
        return [(self.unit_file(u), u - 1 if u else None) for u in sorted(self.units_of)]

    def hash_files(self, progress: Progress, files: list[str] | None = None) -> dict[str, str]:
        """sha256 of each source safetensors file (the run's identity); ``files``: only these."""
        files = list(self.ckpt.files) if files is None else files
        progress.start("hash", len(files))
        out = {}
        for f in files:
            out[f] = sha256_file(self.source.path / f)
            progress.advance("hash", file=f)
        progress.finish("hash")
        return out

    def total_params(self) -> int:
        """Parameters of the source (FP8 scale tensors are not parameters)."""
        from tuckerize.fp8 import element_count

        return element_count(self.ckpt, self.ckpt.keys())

    def describe(self) -> dict[str, Any]:
        """The manifest's source dtypes: of all tensors, of the routed experts, and the
        checkpoint's FP8 quantisation (None when it has none)."""
        from tuckerize.fp8 import is_scale_name, source_dtypes

        return {"dtypes": source_dtypes(self.ckpt, self.ckpt.keys()),
                "expert_dtypes": source_dtypes(self.ckpt, [n for n in sorted(self.replaced) if not is_scale_name(n)]),
                "quantization": self.ckpt.fp8.to_dict() if self.ckpt.fp8 is not None else None}

    def tucker_fp8(self) -> dict[str, Any] | None:
        """The Tucker config's ``fp8`` entry: what happened to an FP8 source's tensors."""
        if self.ckpt.fp8 is None:
            return None
        return {**self.ckpt.fp8.to_dict(), "experts": "dequantised to float32 factors",
                "non_experts": "kept FP8 with their scale tensors, byte-identical"}

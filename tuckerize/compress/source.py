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

#: safetensors dtype of a routed-expert weight -> the factor dtype (:data:`tuckerize.quant.DTYPES`)
#: that keeps its precision.
_KEEPS = {"BF16": "bf16", "F16": "fp16", "F32": "float32", "F64": "float32"}
#: ``torch_dtype``/``dtype`` of a config.json -> factor dtype.
_CONFIG_DTYPES = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "float32", "float": "float32"}
#: Factor dtypes, widest first: experts stored in several dtypes take the widest (bf16 before
#: fp16: its range holds both).
_WIDEST = ("float32", "bf16", "fp16")


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
        from tuckerize.fp8 import source_dtypes

        return {"dtypes": source_dtypes(self.ckpt, self.ckpt.keys()),
                "expert_dtypes": source_dtypes(self.ckpt, self.expert_weights()),
                "quantization": self.ckpt.fp8.to_dict() if self.ckpt.fp8 is not None else None}

    def expert_weights(self) -> list[str]:
        """The routed-expert weight tensors replaced by factors (their FP8 scales left out)."""
        from tuckerize.fp8 import is_scale_name

        return [n for n in sorted(self.replaced) if not is_scale_name(n)]

    def expert_bytes(self) -> int:
        """Bytes the routed experts take in the source as stored (FP8 scale tensors included)."""
        return sum(self.ckpt.nbytes(n) for n in self.replaced)

    def factor_dtype(self) -> dict[str, Any]:
        """The dtype factors are stored in unless asked otherwise, and why (the manifest's
        ``bytes.source_dtype``): the routed experts' stored dtype (bf16, float16, float32);
        for FP8 experts the dtype the model computes in (config ``torch_dtype``/``dtype``,
        bf16 where it names none); experts stored in several dtypes take the widest.
        ``{"dtype": "bf16", "stored": ["BF16"], "reason": "..."}``."""
        from tuckerize.fp8 import is_fp8

        stored = sorted({self.ckpt.dtype(n) for n in self.expert_weights()})
        named = self.config.get("torch_dtype") or self.config.get("dtype")
        chosen, why = set(), []
        for d in stored:
            if d in _KEEPS:
                chosen.add(_KEEPS[d])
            elif is_fp8(d):
                compute = _CONFIG_DTYPES.get(str(named), "bf16")
                chosen.add(compute)
                why.append(f"FP8 experts are dequantised and computed in {compute} "
                           + (f"(config dtype {named})" if str(named) in _CONFIG_DTYPES else "(the config names no dtype)"))
            else:
                chosen.add("float32")
                why.append(f"{d} experts kept in float32")
        dtype = next((d for d in _WIDEST if d in chosen), "float32")
        reason = f"routed experts stored in {', '.join(stored)}"
        if len(chosen) > 1:
            why.append(f"several dtypes: the widest, {dtype}")
        return {"dtype": dtype, "stored": stored, "reason": "; ".join([reason, *why])}

    def tucker_fp8(self, factor_dtypes: dict[str, str] | None = None) -> dict[str, Any] | None:
        """The Tucker config's ``fp8`` entry: what happened to an FP8 source's tensors
        (``factor_dtypes``: how the factors are stored; None: float32)."""
        if self.ckpt.fp8 is None:
            return None
        kinds = sorted(set(factor_dtypes.values())) if factor_dtypes else ["float32"]
        experts = ("dequantised to float32 factors" if kinds == ["float32"]
                   else f"dequantised to float32, decomposed, factors stored as {'/'.join(kinds)}")
        return {**self.ckpt.fp8.to_dict(), "experts": experts,
                "non_experts": "kept FP8 with their scale tensors, byte-identical"}

"""The Tucker checkpoint's ``config.json`` section and ``tuckerize_manifest.json``, built
from what a run recorded: pure functions, no files read or written here.

The manifest holds provenance (source, its file checksums), the rank plan, the settings,
per-tensor errors and parameter counts, ``files`` (each layer file's size, sha256,
tensors, errors and timings: ``seconds`` to read and decompose it, ``collect_seconds`` its
calibration statistics, when calibrated), ``written`` (every other file the run wrote) and ``side_files``
(size and sha256 of each of those, tokenizer and generation config included).
"""

from __future__ import annotations

from typing import Any, Mapping

from tuckerize.version import __version__
from tuckerize.allocate import dense_params, tucker_params
from tuckerize.arch import FACTORS, PROJECTIONS, MoESpec
from tuckerize.format import FORMAT_VERSION
from tuckerize.format import tucker_config as format_tucker_config


def layer_ranks(plan, spec: MoESpec) -> dict[str, dict[str, list[int]]]:
    """``{"layer": {projection: [r_E, r_H, r_I]}}`` of every MoE layer."""
    return {str(layer): {p: list(plan.ranks_for(layer, p)) for p in PROJECTIONS} for layer in spec.moe_layers}


def tucker_config(src_config: Mapping[str, Any], spec: MoESpec, ranks: Mapping[str, Any],
                  factor_storage: Mapping[str, Any] | None = None,
                  fp8: Mapping[str, Any] | None = None,
                  forms: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """The output ``config.json``: the source's under Tucker class names
    (:func:`tuckerize.format.tucker_config`), plus the ``tucker`` section (with
    ``factor_storage`` and format version 2 where factors are stored quantised, and ``fp8``
    where the source is FP8). ``forms`` (``--bytes``): every projection's ``form``, ``base``
    and ``storage`` beside its ranks (None where it has no Tucker part), format version 3."""
    E, H, I = spec.shape
    section: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "architecture": spec.arch.name,
        "axes": "W[e, h, i] = sum core[a, b, c] U_E[e, a] U_H[h, b] U_I[i, c]; gate/up/down share (E, H, I)",
        "factors": list(FACTORS),
        "layers": {
            str(layer): {p: {"ranks": ranks[str(layer)][p], "shape": [E, H, I]} for p in PROJECTIONS}
            for layer in spec.moe_layers
        },
    }
    if factor_storage is not None:
        section.update(format_version=2, factor_storage=dict(factor_storage))
    if forms is not None:
        section["format_version"] = 3
        for layer, entry in section["layers"].items():
            for p in PROJECTIONS:
                entry[p].update(forms[layer][p])
    if fp8 is not None:  # quantization_config stays: it describes the non-expert FP8 tensors kept
        section["fp8"] = dict(fp8)
    return format_tucker_config(dict(src_config), section)


def expert_bytes(counted: Mapping[str, Any], source_bytes: int | None, source_dtype: Mapping[str, Any] | None,
                 factor_dtype: str | None) -> dict[str, Any]:
    """The manifest's ``bytes``: the stored factors (:func:`tuckerize.quant.checkpoint_bytes`)
    against the bf16 dense experts and against the source's experts as stored
    (``experts_source``, ``ratio_to_source``), with where the factor dtypes came from
    (``dtypes_from``: ``"source"`` or the ``factor_dtype`` given) and ``source_dtype``."""
    out = dict(counted)
    if source_bytes:
        out["experts_source"] = source_bytes
        out["ratio_to_source"] = out["experts_stored"] / source_bytes
    if source_dtype is not None:
        out["source_dtype"] = dict(source_dtype)
        out["dtypes_from"] = "source" if factor_dtype is None else f"factor_dtype {factor_dtype}"
    return out


def stored_values(shape, info: Mapping[str, Any]) -> int:
    """Values a projection stores: its Tucker parameters, and ``E H I`` codes of a base."""
    count = tucker_params(shape, info["ranks"]) if info.get("ranks") else 0
    return count + (dense_params(shape) if info.get("base") else 0)


def budget_bytes(spec: MoESpec, per_tensor, bytes_plan) -> dict[str, Any]:
    """The manifest's ``bytes`` of a ``--bytes`` run: the stored bytes (every tensor written,
    codes, scales, zeros and shapes), the budget and how it was spent
    (:meth:`~tuckerize.compress.bytes_plan.BytesPlan.info`), and per projection its form,
    ranks, storage, bytes and errors."""
    E, H, I = spec.shape
    dense = len(PROJECTIONS) * E * H * I * 2 * len(spec.moe_layers)
    stored = sum(int(t["bytes"]) for t in per_tensor)
    keys = ("form", "ranks", "base", "storage", "bytes", "estimated_error", "relative_error", "whitened_error")
    return {"experts_dense_bf16": dense, "experts_stored": stored, "ratio_to_bf16_dense": stored / dense,
            "dtypes": {"per_projection": "--bytes"}, "budget": {**bytes_plan.info(), "stored": stored},
            "projections": [{"layer": t["layer"], "projection": t["projection"], **{k: t.get(k) for k in keys}}
                            for t in per_tensor]}


def build_manifest(
    *,
    source,  # tuckerize.checkpoint.ModelSource
    source_files: Mapping[str, str],
    out: str,
    spec: MoESpec,
    plan,
    settings: Mapping[str, Any],
    fingerprint: Mapping[str, Any],
    files: Mapping[str, Any],
    model_params: int,
    wall_seconds: float,
    side_files: Mapping[str, Any],
    calibration: Mapping[str, Any] | None = None,
    allocation: Mapping[str, Any] | None = None,
    factor_storage: Mapping[str, Any] | None = None,
    source_info: Mapping[str, Any] | None = None,
    source_bytes: int | None = None,
    source_dtype: Mapping[str, Any] | None = None,
    factor_dtype: str | None = None,
    bytes_plan=None,
) -> dict[str, Any]:
    """``files``: the journal's entries in unit order; ``model_params``: parameters of the
    source model; ``side_files``: name -> {bytes, sha256} of every non-layer file written;
    ``factor_storage``: how factors are stored (:func:`tuckerize.quant.storage`; None: float32);
    ``source_bytes``: the routed experts' bytes in the source as stored; ``source_dtype``: the
    source's factor dtype and why (:meth:`tuckerize.compress.source.SourceModel.factor_dtype`);
    ``factor_dtype``: the storage asked for (None: the source's dtype); ``bytes_plan``: the
    :class:`~tuckerize.compress.bytes_plan.BytesPlan` of a ``--bytes`` run (``bytes`` then
    says how its budget was spent: :func:`budget_bytes`)."""
    from tuckerize.quant import DEFAULT_GROUP, checkpoint_bytes

    E, H, I = spec.shape
    dense_expert = len(PROJECTIONS) * dense_params(spec.shape) * len(spec.moe_layers)
    tucker_expert = 0
    per_tensor = []
    for entry in files.values():
        for proj, info in entry["errors"].items():
            count = stored_values(spec.shape, info)
            tucker_expert += count
            per_tensor.append({"layer": entry["layer"], "projection": proj, **info, "params": count})
    per_tensor.sort(key=lambda d: (d["layer"], PROJECTIONS.index(d["projection"])))
    model_after = model_params - dense_expert + tucker_expert
    manifest: dict[str, Any] = {
        "tool": "tuckerize",
        "version": __version__,
        "fingerprint": dict(fingerprint),
        "source": {
            "model": source.label,
            "path": str(source.path),
            "hub_id": source.hub_id,
            "revision": source.revision,
            "files_sha256": dict(source_files),
            **dict(source_info or {}),
        },
        "out": out,
        "architecture": spec.arch.name,
        "moe": {"layers": list(spec.moe_layers), "experts": E, "top_k": spec.top_k, "hidden": H, "intermediate": I},
        "rank_plan": plan.to_dict(),
        "settings": dict(settings),
        "tensors": per_tensor,
        "params": {
            "experts_before": dense_expert,
            "experts_after": tucker_expert,
            "experts_ratio": tucker_expert / dense_expert,
            "model_before": model_params,
            "model_after": model_after,
            "model_ratio": model_after / model_params,
        },
        "files": dict(files),
        "wall_seconds": wall_seconds,
    }
    layers: dict[int, dict[str, Any]] = {}
    for t in per_tensor:
        layers.setdefault(t["layer"], {})[t["projection"]] = {"ranks": t["ranks"]}
    fs = factor_storage or {}
    counted = (budget_bytes(spec, per_tensor, bytes_plan) if bytes_plan is not None else
               checkpoint_bytes(spec, layers, fs.get("dtypes"), fs.get("group_size", DEFAULT_GROUP)))
    manifest["bytes"] = expert_bytes(counted, source_bytes, source_dtype, factor_dtype)
    if calibration is not None:
        manifest["calibration"] = dict(calibration)
    if allocation is not None:
        manifest["allocation"] = dict(allocation)
    manifest["written"] = sorted(side_files)
    manifest["side_files"] = {name: dict(side_files[name]) for name in sorted(side_files)}
    return manifest

"""``tuckerize shard``: the writer that pre-slices a Tucker checkpoint per tensor-parallel rank.

The folder it writes (rank folders, ``shard_manifest.json`` written last) is the shard-set
format of :mod:`tuckerize.shardset`, which also reads it back. Every slice keeps its name
from the unsharded checkpoint, so any rank's tensor can be checked against the whole (the
manifest's ``splits`` say which rows or columns it is). Which slice a rank holds is asked of
the runtime's layers, built for that rank on the meta device
(:func:`tuckerize.runtime.plan.rank_splits`): the only place that says how a weight is
split. The source is read one unit (decoder layer) at a time.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Mapping, Sequence

from tuckerize.checkpoint import INDEX_NAME, SIDE_FILES, save_safetensors, sha256_file, write_json
from tuckerize.errors import OutputConflictError, ShardError
from tuckerize.format import MANIFEST_NAME, TuckerCheckpoint
from tuckerize.fp8 import is_scale_name
from tuckerize.integrity import verify_checkpoint
from tuckerize.parallel import LAYOUTS, check_tp, take
from tuckerize.progress import Progress, ensure
from tuckerize.shardset import SHARD_MANIFEST, rank_dir
from tuckerize.version import __version__


def shard_checkpoint(
    tucker: str | Path,
    tp: int,
    *,
    layout: str | None = "intermediate",
    out: str | Path | None = None,
    overwrite: bool = False,
    expert_load: Mapping[int, Sequence[float]] | None = None,
    balance_above: float = 0.2,
    verify: bool = True,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Write one safetensors set per rank holding only that rank's slices; returns the manifest.
    ``layout="auto"`` (or None) takes the layout with the fewest multiply-adds per rank for
    this checkpoint and ``tp`` (:func:`tuckerize.runtime.layout.choose_layout`); the manifest's
    ``layout_choice`` then holds the per-layout costs.

    Layouts that split experts (``expert`` and the hybrids) assign experts to ranks by measured
    load where the contiguous split would leave the busiest rank more than
    ``balance_above`` above the mean: ``expert_load`` ``{layer: pairs per expert}``, by
    default the routed-token counts of the checkpoint's calibration statistics (if it
    was decomposed with calibration). The assignment is recorded in the manifest
    (``expert_assignment``) and in the shard set's config (read by the runtime). The source is checked against its manifest's sha256s first
    (``verify=False``: sizes only)."""
    progress = ensure(progress)
    if layout is not None and layout != "auto" and layout not in LAYOUTS:
        raise ShardError(f"--layout {layout} is not one of {', '.join(LAYOUTS)}")
    src = TuckerCheckpoint.open(tucker)
    verify_checkpoint(src.folder, verify=verify, progress=progress)
    check_tp(src.config, tp)
    # The layers' own rule (torch.nn is imported here only, when the writer runs).
    from tuckerize.runtime.layout import layout_plan, with_assignment
    from tuckerize.runtime.plan import rank_splits

    layout, costs, assignment = layout_plan(src.config, tp, layout, src.folder, expert_load, balance_above)
    choice = None
    if costs is not None:
        choice = {"macs_per_token": {k: v["macs"] for k, v in costs.items()},
                  "sent_per_token": {k: v["sent"] for k, v in costs.items()}}
    config = with_assignment(src.config, tp, layout, assignment)
    config.pop("quantization_config", None)  # FP8 tensors are written dequantised (below)
    plans = [rank_splits(config, tp, r, layout, names=src.tensors.weight_map) for r in range(tp)]
    out = Path(out) if out is not None else Path(f"{Path(tucker).resolve()}-tp{tp}-{layout}")
    tmp_out = _fresh_output(out, overwrite)
    weight_maps, rank_files, splits = _write_ranks(src, plans, tmp_out, tp, progress)

    for r in range(tp):
        write_json(tmp_out / rank_dir(r, tp) / INDEX_NAME, {"metadata": {}, "weight_map": weight_maps[r]})
    for name in SIDE_FILES:
        if (src.folder / name).is_file():
            shutil.copyfile(src.folder / name, tmp_out / name)
    write_json(tmp_out / "config.json", config)
    manifest = {
        "tool": "tuckerize",
        "version": __version__,
        "tp": tp,
        "layout": layout,
        "source": {
            "path": str(Path(tucker).resolve()),
            "manifest_sha256": sha256_file(src.folder / MANIFEST_NAME),
            "model": src.manifest.get("source", {}).get("model"),
        },
        "ranks": [{"dir": rank_dir(r, tp), "files": rank_files[r]} for r in range(tp)],
        # each rank's Tucker expert tensors, as stored (quantised factors stay quantised), per MoE layer
        "expert_bytes_per_layer": [sum(f["expert_bytes"] for f in rank_files[r].values()) / max(1, len(src.spec.moe_layers))
                                   for r in range(tp)],
        "splits": splits,
        "bytes": shard_bytes(src, [sum(f["expert_bytes"] for f in rank_files[r].values()) for r in range(tp)]),
    }
    if choice is not None:
        manifest["layout_choice"] = choice
    if assignment:
        manifest["expert_assignment"] = {str(L): a for L, a in assignment.items()}
    write_json(tmp_out / SHARD_MANIFEST, manifest)
    tmp_out.rename(out)
    manifest["out"] = str(out.resolve())
    return manifest


def _fresh_output(out: Path, overwrite: bool) -> Path:
    """The temporary folder the shard set is written into (renamed to ``out`` when complete),
    after refusing an ``out`` that is not a shard set, or one that is without ``overwrite``."""
    if out.exists():
        ours = (out / SHARD_MANIFEST).is_file() or any(out.glob("rank-*-of-*"))
        if any(out.iterdir()) and not ours:
            raise OutputConflictError(f"output folder {out} exists and is not a shard set; choose another --out or remove it")
        if any(out.iterdir()) and not overwrite:
            raise OutputConflictError(f"shard folder {out} already exists; pass --overwrite to write it again")
        shutil.rmtree(out)
    tmp_out = out.with_name(f".{out.name}.partial")
    if tmp_out.exists():
        shutil.rmtree(tmp_out)
    tmp_out.mkdir(parents=True)
    return tmp_out


def _write_ranks(src: TuckerCheckpoint, plans: list[dict[str, Any]], tmp_out: Path, tp: int, progress: Progress):
    """Each rank's slices of every source file, one file per source unit: ``(weight maps,
    files with sha256 and bytes, splits)`` per rank."""
    files = src.tensors.files
    progress.start("shard", len(files))
    weight_maps: list[dict[str, str]] = [{} for _ in range(tp)]
    rank_files: list[dict[str, dict[str, Any]]] = [{} for _ in range(tp)]
    splits: dict[str, Any] = {}
    for r in range(tp):
        (tmp_out / rank_dir(r, tp)).mkdir()
    from tuckerize.quant import logical_names

    for filename in files:
        names = logical_names(n for n, f in src.tensors.weight_map.items() if f == filename)
        # FP8 tensors are written dequantised: block scales do not follow arbitrary row splits;
        # factors stored quantised stay quantised where the split keeps whole groups (_Stored)
        full = {n: _Stored(src.tensors, n) for n in names if not is_scale_name(n)}
        for r in range(tp):
            local = {}
            for n, t in full.items():
                sp = plans[r].get(n)
                local.update(t.slice(sp))
                if sp is not None and sp.index is not None:
                    entry = splits.setdefault(n, {"axis": sp.axis, "full": t.shape, "rows": [None] * tp})
                    entry["rows"][r] = list(sp.index)
                elif sp is not None:
                    entry = splits.setdefault(n, {"axis": sp.axis, "full": t.shape, "ranges": [None] * tp})
                    entry["ranges"][r] = [sp.start, sp.stop]
            path = tmp_out / rank_dir(r, tp) / filename
            save_safetensors(local, path, metadata={"format": "pt"})
            rank_files[r][filename] = {"sha256": sha256_file(path), "bytes": path.stat().st_size,
                                       "expert_bytes": sum(t.numel() * t.element_size() for n, t in local.items()
                                                           if ".experts." in n)}
            weight_maps[r].update({n: filename for n in local})
        del full
        progress.advance("shard", file=filename)
    progress.finish("shard")
    return weight_maps, rank_files, splits


def shard_bytes(src: TuckerCheckpoint, per_rank: list[int]) -> dict[str, Any]:
    """The shard manifest's ``bytes``: the routed experts' bytes all ranks store together
    (factors a layout replicates count once per rank), against the source's experts as
    stored (from the Tucker manifest; absent for checkpoints written before it was
    recorded) and against bf16 dense experts (from the shapes)."""
    E, H, I = src.spec.shape
    stored = sum(per_rank)
    dense = 3 * E * H * I * 2 * len(src.spec.moe_layers)
    tucker = src.manifest.get("bytes") or {}
    out: dict[str, Any] = {"experts_stored": stored, "experts_stored_per_rank": list(per_rank),
                           "experts_unsharded": tucker.get("experts_stored"),
                           "experts_dense_bf16": dense, "ratio_to_bf16_dense": stored / dense}
    if tucker.get("experts_source"):
        out.update(experts_source=tucker["experts_source"], ratio_to_source=stored / tucker["experts_source"],
                   source_dtype=tucker.get("source_dtype"))
    return out


class _Stored:
    """One tensor of the source as the shard writer needs it: a factor stored quantised
    (:mod:`tuckerize.quant`) keeps its codes and scales, sliced without dequantising
    (:func:`tuckerize.quant.slice_stored`) where the split allows; everything else is read
    (FP8 dequantised) and sliced (:func:`tuckerize.parallel.take`). A packed quantised base
    (:mod:`tuckerize.quant_packed`) is never written dequantised: a split through its groups
    is an error (the runtime's splits keep whole groups)."""

    def __init__(self, tensors, name: str):
        from tuckerize.quant import is_quantised, read_stored, stored_shape

        self.name = name
        self.stored = None
        if is_quantised(tensors.weight_map, name):
            self.stored = read_stored(tensors, name)
            self.shape = stored_shape(self.stored, name)
            self._full = None
        else:
            self._full = tensors.get(name, dequantize=True)
            self.shape = list(self._full.shape)

    def full(self):
        if self._full is None:
            from tuckerize.quant import decode

            self._full = decode(self.stored, self.name)
        return self._full

    def slice(self, sp) -> dict[str, Any]:
        """``{stored name: tensor}`` of this rank's split ``sp`` (None: the whole)."""
        if self.stored is not None:
            if sp is None:
                return dict(self.stored)
            import torch

            from tuckerize.quant import slice_stored

            rows = torch.tensor(sp.index, dtype=torch.long) if sp.index is not None else None
            got = slice_stored(self.stored, self.name, sp.axis, rows=rows, start=sp.start, stop=sp.stop)
            if got is not None:
                return got
            if self.name.endswith(".base"):
                raise ShardError(f"{self.name}: the split [{sp.start}, {sp.stop}) of axis {sp.axis} cuts the groups "
                                 "of the packed base; choose another --tp or --layout")
        return {self.name: take(self.full(), sp).contiguous()}

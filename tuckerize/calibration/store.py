"""Calibration statistics on disk: the file, its metadata and what they depend on.

``calibration_stats.safetensors`` holds every MoE layer's fields (``layers.{L}.{name}``,
:mod:`tuckerize.calibration.stats`): float64, the per-expert ``[E, d, d]`` fields (E times
larger than the rest) in float16 scaled per expert (``{name}_scale`` [E] float32: each
expert's largest magnitude; :func:`quantize_expert`), read back as float32. Measured on
the demo models (BENCHMARKS.md, calibration): the same held-out perplexity as float32
(within 0.0021%) at half the size; format 3 (format 2 stored them in float32).
It is written one layer at a time as calibration goes (all shapes are known up front, so
the header comes first: :class:`StreamingSafetensors`) and read back one layer at a time
(:class:`LazyLayers`). ``calibration_stats.json`` beside it records the
:class:`CalibrationSettings` (a mismatch means: collect again), the layers, the time taken
(in all, and per MoE layer: ``collect_seconds``) and the file's sha256.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections import abc
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from tuckerize.calibration.stats import stored_dtype
from tuckerize.checkpoint import sha256_file, tmp_name, write_json
from tuckerize.errors import CalibrationError

STATS_NAME = "calibration_stats.safetensors"
STATS_META = "calibration_stats.json"
STATS_VERSION = 3


@dataclass
class CalibrationSettings:
    """What a set of statistics depends on (stored with them; a mismatch means recollect)."""

    source: str
    samples: int
    seqlen: int
    text_sha256: str
    model_sha256: str = ""
    per_expert: bool = False
    version: int = STATS_VERSION
    #: "dense": every layer sees the original model's hidden states.
    stream: str = "dense"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def key(self) -> dict[str, Any]:
        """The fields that must match for statistics to be reused (not the label)."""
        d = self.to_dict()
        d.pop("source")
        return d


def expert_load(folder: Path) -> dict[int, list[float]]:
    """Routed tokens per expert and layer (``expert_count``) from the statistics saved in
    a checkpoint ``folder``; empty when it was decomposed without calibration."""
    path = Path(folder) / STATS_NAME
    if not path.is_file():
        return {}
    from safetensors import safe_open

    out = {}
    with safe_open(str(path), "pt") as f:
        for key in f.keys():
            parts = key.split(".")
            if len(parts) == 3 and parts[0] == "layers" and parts[2] == "expert_count":
                out[int(parts[1])] = [float(v) for v in f.get_tensor(key).tolist()]
    return out


def model_fingerprint(source_files: Mapping[str, str]) -> str:
    return hashlib.sha256(json.dumps(dict(sorted(source_files.items()))).encode()).hexdigest()


def quantize_expert(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, scale)`` of a per-expert field ``t`` [E, ...]: ``scale`` [E] float32 the largest
    magnitude of each expert's slice (1 for an all-zero slice), ``q = t / scale`` in float16
    (|q| <= 1: no overflow however many tokens were summed)."""
    t64 = t.detach().to("cpu", torch.float64)
    scale = t64.abs().reshape(t64.shape[0], -1).amax(1).to(torch.float32)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = (t64 / scale.double().view(-1, *([1] * (t64.ndim - 1)))).to(torch.float16)
    return q, scale


def dequantize_expert(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float32 ``q * scale`` per expert (the inverse of :func:`quantize_expert`)."""
    return q.float() * scale.float().view(-1, *([1] * (q.ndim - 1)))


_TORCH_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16}
_SIZES = {"F64": 8, "F32": 4, "F16": 2}


class StreamingSafetensors:
    """A safetensors file (float64, per-expert fields float16 with a per-expert scale:
    :func:`stored_dtype`, :func:`quantize_expert`)
    written one tensor at a time: all shapes are known up front, so the header is written first and each layer's statistics go to their offsets
    as soon as the layer is done (nothing of earlier layers stays in memory). Written under
    a temporary name and renamed into place by :meth:`commit`."""

    def __init__(self, path: Path, entries: list[tuple[str, tuple[int, ...]]], metadata: dict[str, str]):
        import math as _math

        header: dict[str, Any] = {"__metadata__": metadata}
        self.offsets: dict[str, tuple[int, tuple[int, ...], torch.dtype]] = {}
        off = 0
        stored = []
        for name, shp in entries:
            dt = stored_dtype(name)
            stored.append((name, shp, dt))
            if dt == "F16":
                stored.append((name + "_scale", (shp[0],), "F32"))
        for name, shp, dt in stored:
            n = _math.prod(shp) * _SIZES[dt]
            header[name] = {"dtype": dt, "shape": list(shp), "data_offsets": [off, off + n]}
            self.offsets[name] = (off, shp, _TORCH_DTYPES[dt])
            off += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * ((8 - len(raw) % 8) % 8)
        self.path = path
        self.tmp = tmp_name(path)  # the package's one temporary-name rule (cleaned up after a killed run)
        self.f = open(self.tmp, "wb")
        self.f.write(len(raw).to_bytes(8, "little"))
        self.f.write(raw)
        self.base = 8 + len(raw)
        self.f.truncate(self.base + off)
        self.written: set[str] = set()

    def write(self, name: str, tensor: torch.Tensor) -> None:
        off, shp, dtype = self.offsets[name]
        if dtype == torch.float16:
            tensor, scale = quantize_expert(tensor)
            self.write(name + "_scale", scale)
        t = tensor.detach().to("cpu", dtype).contiguous()
        assert tuple(t.shape) == tuple(shp), (name, tuple(t.shape), shp)
        self.f.seek(self.base + off)
        self.f.write(t.numpy().tobytes())
        self.written.add(name)

    def commit(self) -> None:
        import os

        missing = set(self.offsets) - self.written
        if missing:
            self.abort()
            raise RuntimeError(f"statistics {sorted(missing)[0]} were never written")
        self.f.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        if not self.f.closed:
            self.f.close()
        self.tmp.unlink(missing_ok=True)


class LazyLayers(abc.Mapping):
    """``layers[L]`` read from the statistics file on demand (one layer at a time)."""

    def __init__(self, path: Path):
        from safetensors import safe_open

        self.path = path
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
            self.shapes = {k: tuple(f.get_slice(k).get_shape()) for k in keys}
        self.names: dict[int, list[str]] = {}
        for k in keys:
            _, L, name = k.split(".", 2)
            if name.endswith("_scale") and k[: -len("_scale")] in self.shapes:
                continue  # the scale of a float16 field, applied on reading
            self.names.setdefault(int(L), []).append(name)

    def __getitem__(self, layer: int) -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        if layer not in self.names:
            raise KeyError(layer)
        out = {}
        with safe_open(str(self.path), framework="pt") as f:
            for n in self.names[layer]:
                key = f"layers.{layer}.{n}"
                t = f.get_tensor(key)
                out[n] = dequantize_expert(t, f.get_tensor(key + "_scale")) if key + "_scale" in self.shapes else t
        return out

    def __iter__(self):
        return iter(sorted(self.names))

    def __len__(self) -> int:
        return len(self.names)

    def shape(self, layer: int, name: str) -> tuple[int, ...]:
        return self.shapes[f"layers.{layer}.{name}"]


@dataclass
class CalibrationStats:
    """Statistics of every MoE layer: in memory (``layers`` a dict) or backed by the
    statistics file (read one layer at a time)."""

    settings: CalibrationSettings
    layers: Mapping[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    seconds: float = 0.0
    path: Path | None = None
    #: MoE layer -> seconds its statistics took to collect (stored as ``collect_seconds``).
    layer_seconds: dict[int, float] = field(default_factory=dict)

    def save(self, folder: str | Path) -> Path:
        """Write ``calibration_stats.safetensors`` and ``calibration_stats.json`` into ``folder``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / STATS_NAME
        if self.path is not None and self.path.resolve() == path.resolve():
            return path
        if isinstance(self.layers, LazyLayers):  # a copy of a file written earlier
            from tuckerize.checkpoint import atomic_write

            with atomic_write(path) as tmp:
                shutil.copyfile(self.layers.path, tmp)
        else:
            entries = [(f"layers.{L}.{k}", tuple(v.shape)) for L in sorted(self.layers) for k, v in self.layers[L].items()]
            writer = StreamingSafetensors(path, entries, {"format": "pt", "tuckerize": "calibration statistics"})
            try:
                for L in sorted(self.layers):
                    for k, v in self.layers[L].items():
                        writer.write(f"layers.{L}.{k}", v)
                writer.commit()
            except BaseException:
                writer.abort()
                raise
        self._write_meta(folder, path)
        self.path = path
        return path

    def _write_meta(self, folder: Path, path: Path) -> None:
        write_json(folder / STATS_META, {"settings": self.settings.to_dict(), "layers": sorted(self.layers),
                                         "seconds": round(self.seconds, 3),
                                         "collect_seconds": {str(L): round(s, 3) for L, s in sorted(self.layer_seconds.items())},
                                         "file_sha256": sha256_file(path)})

    @classmethod
    def load(cls, path: str | Path) -> "CalibrationStats":
        """From ``calibration_stats.safetensors`` (or the folder holding it and its .json);
        layers are read when used."""
        path = Path(path)
        if path.is_dir():
            path = path / STATS_NAME
        meta_path = path.with_name(STATS_META)
        if not path.is_file() or not meta_path.is_file():
            raise CalibrationError(f"calibration statistics {path} (with {STATS_META} beside it) do not exist; "
                                   "pass the file written by a calibrated decompose, or calibration text")
        try:
            meta = json.loads(meta_path.read_text())
            settings = CalibrationSettings(**meta["settings"])
            layers = LazyLayers(path)
        except Exception as exc:  # noqa: BLE001
            raise CalibrationError(f"calibration statistics {path} are unreadable ({type(exc).__name__}); "
                                   "delete them and calibrate again") from None
        return cls(settings=settings, layers=layers, seconds=float(meta.get("seconds", 0.0)), path=path,
                   layer_seconds={int(L): float(s) for L, s in meta.get("collect_seconds", {}).items()})

    def _shape(self, layer: int, name: str) -> tuple[int, ...]:
        if isinstance(self.layers, LazyLayers):
            return self.layers.shape(layer, name)
        return tuple(self.layers[layer][name].shape)

    def check_model(self, moe_layers, shape) -> None:
        E, H, I = shape
        missing = [L for L in moe_layers if L not in self.layers]
        if missing:
            raise CalibrationError(f"calibration statistics have no layer {missing[0]}; they are of another model")
        for L in moe_layers:
            if (self._shape(L, "hidden") != (H, H) or self._shape(L, "inter") != (I, I)
                    or self._shape(L, "expert_mass") != (E,)):
                raise CalibrationError(f"calibration statistics of layer {L} do not fit (E, H, I) = {shape}; "
                                       "they are of another model")


__all__ = ["STATS_META", "STATS_NAME", "STATS_VERSION", "CalibrationSettings", "CalibrationStats", "LazyLayers",
           "StreamingSafetensors", "dequantize_expert", "model_fingerprint", "quantize_expert"]

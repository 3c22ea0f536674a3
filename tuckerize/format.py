"""The Tucker checkpoint format: file and tensor names, the config section, reading back.

A Tucker checkpoint is a folder::

    config.json                       original config + a "tucker" section
    tokenizer*, generation_config.json  copied from the source
    model-00000-of-000NN.safetensors  unit 0: tensors outside decoder layers
    model-000LL-of-000NN.safetensors  unit L+1: decoder layer L, non-expert tensors
                                      and the factors of its MoE experts
    model.safetensors.index.json      tensor name -> file
    tuckerize_manifest.json           written last: provenance, ranks, errors, sizes

This module owns those names, the config section (:func:`tucker_config`), the manifest
reader (:func:`load_manifest`, one-line errors for a missing or damaged manifest, shared
with the shard-set format, :mod:`tuckerize.shardset`) and read access
(:class:`TuckerCheckpoint`). Checking files against the manifest's sha256s is
:mod:`tuckerize.integrity`.

Factor names say layer, projection and factor, after the experts prefix of the
source architecture, e.g. ``model.layers.3.mlp.experts.gate.U_H``. Shapes:
``U_E [E, r_E]``, ``U_H [H, r_H]``, ``U_I [I, r_I]``, ``core [r_E, r_H, r_I]``,
the same semantic axes for gate, up and down. A projection stored with a quantised base
(``tuckerize decompose --bytes``) has ``<prefix>.<projection>.base`` (:func:`base_name`), packed,
beside or instead of its factors; its config entry says ``base`` and ``ranks`` (None: no
Tucker part).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuckerize.arch import (
    FACTORS,
    PROJECTIONS,
    TUCKER_CLASS_PREFIX,
    TUCKER_TYPE_PREFIX,
    Architecture,
    MoESpec,
    moe_spec,
    original_names,
)
from tuckerize.checkpoint import Checkpoint, load_config
from tuckerize.errors import InputError, IntegrityError

FORMAT_VERSION = 1
MANIFEST_NAME = "tuckerize_manifest.json"
JOURNAL_NAME = ".tuckerize-journal.json"
CONFIG_KEY = "tucker"


def load_manifest(path: Path, fix: str) -> dict[str, Any]:
    """A manifest file's JSON object; one-line errors when it is missing or not valid JSON."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{path} is missing; {fix}") from None
    except (OSError, ValueError) as exc:
        raise IntegrityError(f"{path} is damaged (not valid JSON: {exc}); {fix}") from None
    if not isinstance(data, dict):
        raise IntegrityError(f"{path} is damaged (not a JSON object); {fix}")
    return data


def factor_name(experts_prefix: str, projection: str, factor: str) -> str:
    assert projection in PROJECTIONS and factor in FACTORS
    return f"{experts_prefix}.{projection}.{factor}"


def base_name(experts_prefix: str, projection: str) -> str:
    """The logical name of a projection's quantised base ``[E, out, in]`` (stored packed as
    ``<name>.qcodes/.qscale/.qzero/.qshape``, :mod:`tuckerize.quant_packed`)."""
    assert projection in PROJECTIONS
    return f"{experts_prefix}.{projection}.base"


def tucker_config(src_config: dict[str, Any], section: dict[str, Any]) -> dict[str, Any]:
    """config.json of a Tucker checkpoint: the source config with ``section`` under ``tucker``,
    and architectures / model_type renamed (``TuckerizeQwen3MoeForCausalLM``,
    ``tuckerize_qwen3_moe``) so that stock vLLM and transformers refuse the checkpoint
    (they would load the dense architecture with uninitialised experts); the originals are
    recorded in ``tucker.original`` and read back by :func:`tuckerize.arch.original_names`."""
    names, model_type = original_names(src_config)
    out = dict(src_config)
    out["architectures"] = [TUCKER_CLASS_PREFIX + n for n in names]
    if model_type:
        out["model_type"] = TUCKER_TYPE_PREFIX + model_type
    out[CONFIG_KEY] = {**section, "original": {"architectures": names, "model_type": model_type}}
    return out


def unit_file(unit: int, units: int) -> str:
    return f"model-{unit:05d}-of-{units:05d}.safetensors"


def is_unit_file(name: str) -> bool:
    """A name :func:`unit_file` gives."""
    return re.fullmatch(r"model-\d{5}-of-\d{5}\.safetensors", name) is not None


@dataclass
class TuckerCheckpoint:
    """Read access to a Tucker checkpoint written by :func:`tuckerize.compress.decompose_checkpoint`."""

    folder: Path
    config: dict[str, Any]
    tensors: Checkpoint
    manifest: dict[str, Any]

    @classmethod
    def open(cls, folder: str | Path) -> "TuckerCheckpoint":
        folder = Path(folder)
        if not folder.is_dir():
            raise InputError(f"Tucker checkpoint {folder} does not exist; run `tuckerize decompose` first")
        manifest_path = folder / MANIFEST_NAME
        if not manifest_path.is_file():
            raise InputError(
                f"{folder} has no {MANIFEST_NAME}: it is not a finished Tucker checkpoint; rerun `tuckerize decompose`"
            )
        config = load_config(folder)
        if CONFIG_KEY not in config:
            raise InputError(f"{folder}/config.json has no '{CONFIG_KEY}' section; rerun `tuckerize decompose`")
        manifest = load_manifest(manifest_path, "rerun `tuckerize decompose`")
        return cls(folder=folder, config=config, tensors=Checkpoint.open(folder), manifest=manifest)

    @property
    def spec(self) -> MoESpec:
        return moe_spec(self.config)

    @property
    def arch(self) -> Architecture:
        return self.spec.arch

    @property
    def layers(self) -> dict[int, dict[str, Any]]:
        return {int(k): v for k, v in self.config[CONFIG_KEY]["layers"].items()}

    def factors(self, layer: int, projection: str) -> dict[str, Any]:
        prefix = self.arch.experts_prefix(layer)
        return {f: self.tensors.get(factor_name(prefix, projection, f)) for f in FACTORS}


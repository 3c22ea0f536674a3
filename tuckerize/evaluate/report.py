"""The ``eval`` report: one JSON-ready dict (:func:`build_report`) and its PNG (:func:`plot_report`).

Keys: ``settings`` (window length asked and used, device, dtype, runtime, world size (torchrun's
ranks), tensor-parallel size (torchrun's ranks, or a serving runtime's own: ``eval --tp``), KL
top-k and whether the KL is exact), ``text`` (source, sha256, tokens, which windows:
``first_window``, ``windows`` scored, ``windows_in_text``), ``baseline_result`` /
``tucker_result`` (perplexity, mean NLL, tokens per second), ``fidelity`` (mean KL, top-1
agreement, each MoE layer's relative output error), ``perplexity_ratio``, ``compression``
(parameters, from the Tucker manifest), ``compression_bytes`` (:func:`checkpoint_bytes`: the
routed experts' bytes the Tucker checkpoint stores, against the source's experts as stored,
``experts_source`` / ``ratio_to_source``, and against bf16 dense experts,
``experts_dense_bf16`` / ``ratio_to_bf16_dense``), ``shard_bytes`` when a shard set is
evaluated (:func:`shard_set_bytes`: the same for all ranks together, a factor every rank holds
counted on each, and ``experts_stored_per_rank``), ``memory`` (this rank's experts as loaded,
per MoE layer: quantised factors are dequantised at load, so it can exceed the stored bytes),
then the task scores, ``notes`` and ``wall_seconds`` (added by
:func:`tuckerize.evaluate.run.evaluate`). A perplexity that overflows is ``inf`` (written
``null`` in JSON by the CLI).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from tuckerize.evaluate.inputs import EvalInputs, EvalText
from tuckerize.evaluate.runtimes import EvalModel
from tuckerize.version import __version__


def safe_exp(x: float) -> float:
    """exp(x), inf where it overflows (a perplexity of a badly broken model)."""
    return math.exp(x) if x < 709.0 else math.inf


def checkpoint_bytes(inputs: EvalInputs) -> dict[str, Any] | None:
    """The Tucker checkpoint's ``bytes`` (its manifest's, :func:`tuckerize.compress.manifest.expert_bytes`).
    For a shard set whose checkpoint folder is gone, what the shard manifest recorded of it
    (``experts_unsharded``), against the same source and bf16 sizes; None when neither says."""
    if inputs.manifest and inputs.manifest.get("bytes"):
        return dict(inputs.manifest["bytes"])
    shard = (inputs.shard_manifest or {}).get("bytes") or {}
    if not shard.get("experts_unsharded") or not shard.get("experts_dense_bf16"):
        return None
    out = {"experts_stored": shard["experts_unsharded"], "experts_dense_bf16": shard["experts_dense_bf16"],
           "ratio_to_bf16_dense": shard["experts_unsharded"] / shard["experts_dense_bf16"], "from": "shard manifest"}
    if shard.get("experts_source"):
        out.update(experts_source=shard["experts_source"], ratio_to_source=shard["experts_unsharded"] /
                   shard["experts_source"], source_dtype=shard.get("source_dtype"))
    return out


def shard_set_bytes(inputs: EvalInputs) -> dict[str, Any] | None:
    """A shard set's ``bytes`` (all ranks together and per rank, :func:`tuckerize.shard.sharding.shard_bytes`)
    with its ``tp`` and ``layout``; None for an unsharded checkpoint or a shard set written before
    the bytes were recorded."""
    m = inputs.shard_manifest
    if not m or not m.get("bytes"):
        return None
    return {"tp": int(m["tp"]), "layout": str(m["layout"]), **m["bytes"]}


def build_report(inputs: EvalInputs, text: EvalText, base: dict[str, Any], base_cached: bool, tk: dict[str, Any],
                 per_layer: dict[int, float], tucker_model: EvalModel, parallel, device,
                 settings: dict[str, Any]) -> dict[str, Any]:
    """The report of one evaluation; ``settings``: backend, kl_topk, layer_tokens, verify and
    (optional) the serving runtime's own tensor_parallel size."""
    windows = text.windows
    n_tokens = int(base["nll"].numel())
    kl = ("exact" if base["lp_top"].shape[-1] >= base["vocab"]
          else f"top-{base['lp_top'].shape[-1]} of {base['vocab']} + rest bucket (a lower bound)")
    report: dict[str, Any] = {
        "tool": "tuckerize", "version": __version__,
        "model": str(Path(inputs.model)), "baseline": str(inputs.baseline),
        "settings": {"seqlen": inputs.seqlen, "seqlen_requested": inputs.seqlen_requested,
                     "backend": settings["backend"], "device": str(device), "dtype": inputs.dtype,
                     "runtime": tucker_model.runtime, "world_size": parallel.world,
                     "tensor_parallel": max(parallel.world, int(settings.get("tensor_parallel", 1))),
                     "kl_topk": settings["kl_topk"],
                     "kl": kl, "layer_tokens": settings["layer_tokens"], "verified": settings["verify"]},
        "text": {"source": text.label, "sha256": text.sha256, "tokens_in_text": int(text.ids.numel()),
                 "first_window": text.first_window, "windows": len(windows),
                 "windows_in_text": text.windows_in_text, "tokens_scored": n_tokens},
        "baseline_result": {"perplexity": safe_exp(float(base["nll"].mean())), "mean_nll": float(base["nll"].mean()),
                            "cached": base_cached, "tokens_per_s": None if base_cached else
                            windows.numel() / max(base["seconds"], 1e-9)},
        "tucker_result": {"perplexity": safe_exp(float(tk["nll"].mean())), "mean_nll": float(tk["nll"].mean()),
                          "tokens_per_s": windows.numel() / max(tk["seconds"], 1e-9)},
        "fidelity": {"kl_mean": float(tk["kl"].mean()), "top1_agreement": float(tk["agree"].mean()),
                     "layer_relative_error": {str(k): v for k, v in per_layer.items()}},
        "tokens_used": windows.reshape(-1)[:64].tolist(),
    }
    b_ppl, t_ppl = report["baseline_result"]["perplexity"], report["tucker_result"]["perplexity"]
    report["perplexity_ratio"] = t_ppl / b_ppl if math.isfinite(b_ppl) and math.isfinite(t_ppl) else math.inf
    if inputs.manifest:
        report["compression"] = inputs.manifest.get("params")
    for key, value in (("compression_bytes", checkpoint_bytes(inputs)), ("shard_bytes", shard_set_bytes(inputs))):
        if value is not None:
            report[key] = value
    from tuckerize.runtime.tucker_experts import memory_per_layer

    mem = memory_per_layer([getattr(b, "experts", None) for b in tucker_model.moe_blocks.values()])
    if mem is not None:  # this rank's experts as loaded (quantised factors dequantised), per MoE layer
        report["memory"] = {"experts_per_layer_bytes": mem, "rank": parallel.rank,
                            "factor_storage": inputs.tucker_config.get("tucker", {}).get("factor_storage")}
    return report


def plot_report(report: dict[str, Any], path: str | Path) -> None:
    """PNG: per-layer MoE output error, and the two perplexities."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8), gridspec_kw={"width_ratios": [3, 1]})
    layers = sorted(report["fidelity"]["layer_relative_error"], key=int)
    a.bar([int(x) for x in layers], [report["fidelity"]["layer_relative_error"][x] for x in layers], color="#4477aa")
    a.set_xlabel("MoE layer")
    a.set_ylabel("relative error of block output")
    a.set_title("per-layer error (same inputs)")
    vals = [report["baseline_result"]["perplexity"], report["tucker_result"]["perplexity"]]
    b.bar(["original", "Tucker"], vals, color=["#999999", "#ee6677"])
    b.set_title("perplexity")
    for i, v in enumerate(vals):
        b.text(i, v, f"{v:.2f}", ha="center", va="bottom")
    fig.suptitle(Path(report["model"]).name)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)

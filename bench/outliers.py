"""How hard is a model to quantise? Outlier statistics of its routed experts' weights and inputs.

    python bench/outliers.py [--model-folder KEY=FOLDER ...] [--json bench/out/outliers.json]

For each model (the two demos and every ``--model-folder``), on 16 windows of 256 tokens of
``tuckerize/demo/calibration.txt`` (float32, transformers' own modules):

* expert weights: the kurtosis (E[(w - mean)^4] / var^2; 3 for a Gaussian) of each routed
  expert matrix's entries, mean and max over the matrices, and the mean over matrices of the
  largest |w| over the matrix's RMS;
* routed hidden activations (each MoE block's input, the post-attention RMSNorm's output):
  kurtosis of all entries, per layer; the per-channel magnitude profile (mean |x_c| over
  tokens) and its max / median ratio (outlier channels); the kurtosis of the per-channel RMS
  vector (He et al. 2024's outlier-feature measure); mean and max over the MoE layers;
* the residual stream between layers: max |h| / median |h|, the largest over the layers
  (massive activations).

Weight-only round-to-nearest suffers from both: a large weight stretches its group's scale, and
a large input channel multiplies the error of every weight it meets.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from comparison.protocol import MODELS, OUT, add_models  # noqa: E402


def kurtosis(x: torch.Tensor) -> float:
    x = x.double().flatten()
    c = x - x.mean()
    return float((c**4).mean() / (c**2).mean() ** 2)


def weight_stats(folder: Path) -> dict:
    from safetensors.torch import load_file

    from tuckerize.arch import moe_spec
    from tuckerize.checkpoint import load_config

    spec = moe_spec(load_config(folder))
    t = load_file(str(folder / "model.safetensors"))
    kurt, peak = [], []
    for layer in spec.moe_layers:
        for p in ("gate", "up", "down"):
            for e in range(spec.num_experts):
                w = t[spec.arch.expert_name(layer, p, e)].double()
                kurt.append(kurtosis(w))
                peak.append(float(w.abs().max() / w.pow(2).mean().sqrt()))
    return {"weight_kurtosis_mean": sum(kurt) / len(kurt), "weight_kurtosis_max": max(kurt),
            "weight_max_over_rms_mean": sum(peak) / len(peak)}


def activation_stats(folder: Path, windows: int = 16, seqlen: int = 256) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from comparison.protocol import REPO

    tok = AutoTokenizer.from_pretrained(str(folder))
    ids = tok((REPO / "tuckerize" / "demo" / "calibration.txt").read_text(), add_special_tokens=False,
              verbose=False)["input_ids"]
    n = len(ids) // seqlen
    starts = torch.linspace(0, n - 1, windows).round().long().tolist()
    x = torch.tensor([ids[s * seqlen:(s + 1) * seqlen] for s in starts])
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    seen: dict[int, torch.Tensor] = {}
    hooks = [layer.mlp.register_forward_pre_hook(lambda m, a, i=i: seen.__setitem__(i, a[0].detach()))
             for i, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        out = model(input_ids=x, use_cache=False, output_hidden_states=True)
    for h in hooks:
        h.remove()
    per_layer = []
    for i in sorted(seen):
        a = seen[i].reshape(-1, seen[i].shape[-1]).double()
        mag = a.abs().mean(0)
        rms = a.pow(2).mean(0).sqrt()
        per_layer.append({"layer": i, "kurtosis": kurtosis(a),
                          "channel_max_over_median": float(mag.max() / mag.median()),
                          "channel_rms_kurtosis": kurtosis(rms)})
    # the residual stream between layers (hidden_states[-1] is after the final norm)
    resid = max(float(h.abs().max() / h.abs().median()) for h in out.hidden_states[1:-1])
    agg = {f"act_{k}_{f.__name__}": f(p[k] for p in per_layer) for k in
           ("kurtosis", "channel_max_over_median", "channel_rms_kurtosis") for f in (max, mean)}
    return {**agg, "residual_max_over_median": resid, "layers": per_layer}


def mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model-folder", action="append", default=[], metavar="KEY=FOLDER")
    ap.add_argument("--models", help="comma-separated keys (default: the demos and every --model-folder)")
    ap.add_argument("--json", type=Path, default=OUT / "outliers.json")
    args = ap.parse_args(argv)
    add_models(args.model_folder)
    keys = args.models.split(",") if args.models else list(MODELS)
    res = {k: {"folder": str(MODELS[k]), **weight_stats(MODELS[k]), **activation_stats(MODELS[k])} for k in keys}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(res, indent=1))
    print("| model | weight kurtosis mean / max | max abs(w) / rms | input kurtosis mean / max | channel max / median "
          "mean / max | channel-RMS kurtosis mean / max | residual max / median |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for k, r in res.items():
        print(f"| {k} | {r['weight_kurtosis_mean']:.2f} / {r['weight_kurtosis_max']:.2f} | "
              f"{r['weight_max_over_rms_mean']:.1f} | {r['act_kurtosis_mean']:.1f} / {r['act_kurtosis_max']:.1f} | "
              f"{r['act_channel_max_over_median_mean']:.1f} / {r['act_channel_max_over_median_max']:.1f} | "
              f"{r['act_channel_rms_kurtosis_mean']:.1f} / {r['act_channel_rms_kurtosis_max']:.1f} | "
              f"{r['residual_max_over_median']:.0f} |")


if __name__ == "__main__":
    main()

"""What calibration accumulates per MoE layer (:class:`LayerStats`) and why; the file layout.

The statistics are filled by :mod:`tuckerize.calibration.collect` running the model one
decoder layer at a time (:mod:`tuckerize.runtime.layerwise`).

Statistics per MoE layer, accumulated in float64 (``x``: the block input of a token,
``a_e = act(x W_gate,e) * (x W_up,e)``: the input of expert e's down projection,
``w_e``: the routing weight of the token for expert e):

``hidden``          sum_t x^T x                    (H x H)  input covariance of gate/up
``hidden_routed``   sum_t (sum_k w_k^2) x^T x      (H x H)  the same, weighted as the block output
``inter``           sum_e sum_{t->e} a_e^T a_e     (I x I)  input covariance of down, pooled
``inter_routed``    sum_e sum_{t->e} w_e^2 a_e^T a_e
``expert_count``    tokens routed to each expert   (E)
``expert_mass``     sum_{t->e} w_e^2               (E)
``inter_expert``    sum_{t->e} w_e^2 a_e^T a_e     (E x I x I)  expert e's own down inputs
``up_expert``       sum_{t->e} w_e^2 s^T s, s = act(g_e)            (E x I x I)
``gate_expert``     sum_{t->e} w_e^2 q^T q, q = u_e * act'(g_e)     (E x I x I)
``hidden_expert``   sum_{t->e} w_e^2 x^T x (E x H x H; only with ``per_expert=True``,
                    ``--expert-hidden``: affordable for small models only)

The per-expert tensors are stored in float16 scaled per expert (accumulated in float64;
:mod:`tuckerize.calibration.store`): for Qwen3-30B-A3B they are 3 x 128 x 768^2 values per
layer (0.45 GB, 22 GB for 48 layers; float32 was twice that, with the same results on the
demo models, BENCHMARKS.md).

Why these: the squared error that a change dW_e of expert e's gate/up makes in the
block output is, to first order, sum_{t->e} w_e^2 ||(x dW_e o s) W_down,e^T||^2 (s as
above for up, q for gate), and of its down projection exactly
sum_{t->e} w_e^2 ||a_e dW_e^T||^2. The hidden side is shared by all experts (the same
residual-stream coordinates), so the pooled ``hidden_routed`` serves it; the intermediate
side is not (neuron i of two experts are unrelated), so it is weighted per expert
(:mod:`tuckerize.decompose.expert_weighted`). The pooled ``inter_routed`` feeds the older
pooled whitening (``--whitening pooled``) and the allocation's spectra.
"""

from __future__ import annotations

import torch

#: Per-expert [E, I, I] statistics collected in every calibration (module docstring).
EXPERT_FIELDS = ("inter_expert", "up_expert", "gate_expert")


class LayerStats:
    """Float64 accumulators of one MoE layer (see the module docstring for the fields)."""

    def __init__(self, E: int, H: int, I: int, per_expert: bool = False, device=None):
        f64 = {"dtype": torch.float64, "device": device}
        self.E, self.H, self.I = E, H, I
        self.t: dict[str, torch.Tensor] = {
            "hidden": torch.zeros(H, H, **f64),
            "hidden_routed": torch.zeros(H, H, **f64),
            "inter": torch.zeros(I, I, **f64),
            "inter_routed": torch.zeros(I, I, **f64),
            "expert_count": torch.zeros(E, **f64),
            "expert_mass": torch.zeros(E, **f64),
            "tokens": torch.zeros(1, **f64),
        }
        for name in EXPERT_FIELDS:
            self.t[name] = torch.zeros(E, I, I, **f64)
        if per_expert:
            self.t["hidden_expert"] = torch.zeros(E, H, H, **f64)

    def all_reduce(self, group) -> None:
        """Sum every field over the ranks of ``group`` (a ``torch.distributed`` process group)."""
        import torch.distributed as dist

        for v in self.t.values():
            dist.all_reduce(v, op=dist.ReduceOp.SUM, group=group)

    def add_tokens(self, x: torch.Tensor, w2: torch.Tensor) -> None:
        """Block inputs ``x`` [T, H] and ``w2`` [T] = sum over the token's experts of w^2."""
        x64 = x.detach().to(torch.float64)
        self.t["hidden"].addmm_(x64.T, x64)
        self.t["hidden_routed"].addmm_((x64 * w2.to(torch.float64)[:, None]).T, x64)
        self.t["tokens"] += x.shape[0]

    def add_expert(self, e: int, x: torch.Tensor, a: torch.Tensor, w: torch.Tensor,
                   s: torch.Tensor, q: torch.Tensor) -> None:
        """Expert ``e``'s routed tokens: block inputs ``x`` [n, H], down inputs ``a`` [n, I],
        weights [n], ``s = act(g)`` and ``q = u * act'(g)`` [n, I]."""
        a64 = a.detach().to(torch.float64)
        w2 = w.detach().to(torch.float64).pow(2)
        self.t["inter"].addmm_(a64.T, a64)
        aw = a64 * w2[:, None]
        self.t["inter_routed"].addmm_(aw.T, a64)
        self.t["inter_expert"][e].addmm_(aw.T, a64)
        for name, v in (("up_expert", s), ("gate_expert", q)):
            v64 = v.detach().to(torch.float64)
            self.t[name][e].addmm_((v64 * w2[:, None]).T, v64)
        self.t["expert_count"][e] += a.shape[0]
        self.t["expert_mass"][e] += w2.sum()
        if "hidden_expert" in self.t:
            x64 = x.detach().to(torch.float64)
            self.t["hidden_expert"][e].addmm_((x64 * w2[:, None]).T, x64)


def stats_layout(moe_layers, shape, per_expert: bool = False) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes of the statistics file's tensors (known before collecting)."""
    E, H, I = shape
    fields = [("hidden", (H, H)), ("hidden_routed", (H, H)), ("inter", (I, I)), ("inter_routed", (I, I)),
              ("expert_count", (E,)), ("expert_mass", (E,)), ("tokens", (1,))]
    fields += [(name, (E, I, I)) for name in EXPERT_FIELDS]
    if per_expert:
        fields += [("hidden_expert", (E, H, H))]
    return [(f"layers.{L}.{k}", shp) for L in moe_layers for k, shp in fields]


def stored_dtype(name: str) -> str:
    """Safetensors dtype of a statistics field: per-expert tensors in float16, scaled per
    expert (they are E times larger than the rest; :func:`tuckerize.calibration.store.quantize_expert`),
    the others in float64."""
    return "F16" if name.rsplit(".", 1)[-1].endswith("_expert") else "F64"


__all__ = ["EXPERT_FIELDS", "LayerStats", "stats_layout", "stored_dtype"]

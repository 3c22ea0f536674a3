"""A dispatch-mode guard for code that must run inside a CUDA graph: it records every op
with its output shapes and flags host synchronisation and value-dependent shapes.

Flagged: ``aten._local_scalar_dense`` (``.item()``, ``int(t)``, ``bool(t)``), ``.tolist()`` /
``.numpy()`` (they read memory without dispatching an op: patched while the mode is on),
ops whose output shape depends on values (``nonzero``, ``masked_select``, ``bincount``,
``unique`` and its variants, ``argwhere``, ``masked_scatter``), ops returning a Python value
computed from tensor values (``equal``, ``is_nonzero``, ``allclose``), boolean-mask indexing
(``index``/``index_put`` with a bool tensor) and ``repeat_interleave`` with tensor repeats
and no ``output_size``. Tests compare the recorded traces of different routings: a static
forward runs the same ops on the same shapes whatever the routing.

What it inspects is the forward's own ops, the level torch.compile and a CUDA graph see: like
the ops an aten kernel runs internally (invisible to a dispatch mode), what an opaque custom
op's implementation does is that kernel's business (``.tolist()`` inside it is not counted).
Whether a kernel can be captured on a device is decided where it is chosen
(``tuckerize.runtime.kernels``: the CPU's grouped product reads its offsets from host memory,
which on the CPU is no synchronisation).
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

FORBIDDEN = {"_local_scalar_dense", "nonzero", "masked_select", "bincount", "unique", "_unique", "_unique2",
             "unique_consecutive", "unique_dim", "argwhere", "masked_scatter", "equal", "is_nonzero", "allclose"}


class SyncGuard(TorchDispatchMode):
    """``with SyncGuard() as g: ...``; then ``g.violations`` (names) and ``g.trace``
    ((op, output shapes) in order)."""

    def __init__(self):
        super().__init__()
        self.trace: list[tuple[str, tuple]] = []
        self.violations: list[str] = []
        self._depth = 0  # > 0 while an op's implementation runs

    def __enter__(self):
        self._saved = {n: getattr(torch.Tensor, n) for n in ("tolist", "numpy")}
        for n, orig in self._saved.items():
            def watched(t, *a, _n=n, _orig=orig, **k):
                if self._depth == 0:
                    self.violations.append(_n)
                return _orig(t, *a, **k)
            setattr(torch.Tensor, n, watched)
        return super().__enter__()

    def __exit__(self, *exc):
        for n, orig in self._saved.items():
            setattr(torch.Tensor, n, orig)
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name in FORBIDDEN:
            self.violations.append(name)
        if name == "repeat_interleave" and kwargs.get("output_size") is None:  # output_size: keyword-only
            repeats = args[0] if func._overloadname == "Tensor" else (args[1] if len(args) > 1 else None)
            if isinstance(repeats, torch.Tensor):
                self.violations.append("repeat_interleave without output_size")
        if name in ("index", "index_put", "index_put_"):
            idx = args[1] if len(args) > 1 else []
            if any(isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in idx):
                self.violations.append(f"{name}[bool mask]")
        self._depth += 1
        try:
            out = func(*args, **kwargs)
        finally:
            self._depth -= 1
        outs = out if isinstance(out, (tuple, list)) else (out,)
        self.trace.append((name, tuple(tuple(o.shape) for o in outs if isinstance(o, torch.Tensor))))
        return out


def guarded(fn, *args):
    """Run ``fn(*args)`` under no_grad and a :class:`SyncGuard`; returns the guard."""
    with torch.no_grad(), SyncGuard() as guard:
        fn(*args)
    return guard

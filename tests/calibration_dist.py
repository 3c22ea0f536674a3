"""Worker for tests/calibration/test_distributed_calibration.py (an importable module:
spawned ranks unpickle it by name). Each rank collects the demo model's statistics with
the process group, in memory and into a shared folder, and once with ``group=None``."""

from __future__ import annotations

import json
from pathlib import Path


def calibration_worker(rank: int, world: int, init_method: str, out_dir: str, samples: int, seqlen: int,
                       batch_size: int) -> None:
    import numpy as np
    import torch.distributed as dist
    from dist_helpers import init_gloo

    from tuckerize.calibration.collect import collect_statistics
    from tuckerize.calibration.store import CalibrationSettings
    from tuckerize.calibration.tokens import calibration_tokens
    from tuckerize.demo import demo_path
    from tuckerize.text import read_text

    init_gloo(rank, world, init_method)
    out = Path(out_dir)
    try:
        text, label = read_text("demo")
        tokens = calibration_tokens(text, demo_path(), samples, seqlen)
        settings = CalibrationSettings(source=label, samples=samples, seqlen=seqlen, text_sha256="t")
        group = dist.group.WORLD
        for name, kw in (("memory", {"group": group}), ("alone", {"group": None})):
            stats = collect_statistics(demo_path(), settings, tokens, batch_size=batch_size, **kw)
            for layer, fields in stats.layers.items():
                for k, v in fields.items():
                    np.save(out / f"{name}-r{rank}-L{layer}-{k}.npy", v.numpy())
        stats = collect_statistics(demo_path(), settings, tokens, batch_size=batch_size, group=group,
                                   out=out / "shared")
        first = sorted(stats.layers)[0]
        (out / f"file-r{rank}.json").write_text(json.dumps({
            "path": str(stats.path), "layers": sorted(stats.layers),
            "tokens": float(stats.layers[first]["tokens"]),
            "listing": sorted(p.name for p in (out / "shared").iterdir())}))
        dist.barrier()
    finally:
        dist.destroy_process_group()

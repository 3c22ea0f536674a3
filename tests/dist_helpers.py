"""Real multi-process runs for distributed tests: gloo on CPU, spawned workers.

:func:`run_workers` starts ``world`` processes with ``torch.multiprocessing`` (spawn),
waits for them with a deadline and kills the ones it started if the deadline passes,
so a test never hangs; an exception in any worker fails the test with the worker's
traceback. Workers report results through files (numpy arrays and JSON), never
through shared torch tensors, which die with the worker that made them.

Worker functions must live in an importable module (this one or another under
tests/): spawned children unpickle them by module name (``tests/`` is on
``sys.path``, inherited by spawned children).
"""

from __future__ import annotations

import json
import os
import socket
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable


def free_port() -> int:
    """A TCP port that was free a moment ago (bind to port 0, read it, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_workers(fn: Callable[..., None], world: int, args: tuple = (), timeout: float = 120.0) -> None:
    """Run ``fn(rank, world, init_method, *args)`` in ``world`` spawned processes.

    ``init_method`` is a tcp:// address on 127.0.0.1 with a free port. Raises
    ``TimeoutError`` (after killing the workers) if they do not all finish within
    ``timeout`` seconds, and torch's ``ProcessRaisedException`` / ``ProcessExitedException``
    (with the worker's traceback) if one fails.
    """
    import torch.multiprocessing as mp

    init_method = f"tcp://127.0.0.1:{free_port()}"
    ctx = mp.start_processes(fn, args=(world, init_method, *args), nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=max(0.05, min(1.0, deadline - time.monotonic()))):
            if time.monotonic() > deadline:
                alive = [r for r, p in enumerate(ctx.processes) if p.is_alive()]
                raise TimeoutError(
                    f"distributed workers did not finish within {timeout:.0f} s (ranks still running: {alive}); "
                    "a collective is probably waiting for a rank that never joined"
                )
    finally:
        for p in ctx.processes:  # only the processes started above
            if p.is_alive():
                p.kill()
                p.join(5)


def init_gloo(rank: int, world: int, init_method: str, timeout_s: float = 60.0) -> None:
    """One CPU thread, then a gloo process group whose collectives time out instead of hanging."""
    import torch
    import torch._dynamo  # noqa: F401  (first, as tuckerize.parallel.init_from_env does: see there)
    import torch.distributed as dist

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout_s))


def moe_block_worker(rank: int, world: int, init_method: str, jobs_file: str, out_dir: str) -> None:
    """For each job of ``jobs_file`` (JSON): open the shard set with this process group,
    build every MoE block listed, run it on the job's input and save the output as
    ``out_dir/<job>-L<layer>-r<rank>.npy``; jobs with ``"expect_error"`` record the
    ShardError they must raise (or its absence) in ``<job>-r<rank>.json``."""
    import numpy as np
    import torch
    import torch.distributed as dist

    from tuckerize.errors import ShardError
    from tuckerize.parallel import ParallelContext
    from tuckerize.runtime.loader import TensorSource, build_moe_block

    init_gloo(rank, world, init_method)
    out = Path(out_dir)
    jobs = json.loads(Path(jobs_file).read_text())
    try:
        for job in jobs:
            if job.get("expect_error"):
                report: dict[str, Any] = {"error": None}
                try:
                    TensorSource.open(job["shard_dir"], ParallelContext.current(), layout=job.get("layout"))
                except ShardError as exc:
                    report = {"error": str(exc), "type": type(exc).__name__}
                (out / f"{job['name']}-r{rank}.json").write_text(json.dumps(report))
                continue
            source = TensorSource.open(job["shard_dir"], ParallelContext.current())
            x = torch.from_numpy(np.load(job["input"]))
            for layer in job["layers"]:
                block = build_moe_block(source, layer)
                with torch.no_grad():
                    y = block(x)
                np.save(out / f"{job['name']}-L{layer}-r{rank}.npy", y.numpy())
            opened = sorted(str(Path(source.tensors.folder) / f) for f in source.tensors._headers)
            info = {"kind": source.kind, "rank": source.parallel.rank, "world": source.parallel.world,
                    "layout": source.layout, "folder": str(source.tensors.folder), "opened": opened}
            (out / f"{job['name']}-r{rank}.json").write_text(json.dumps(info))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def exit_worker(rank: int, world: int, init_method: str, out_dir: str) -> None:
    """A CLI entry point's life under torchrun: the group from ``init_from_env`` (torchrun's
    environment), a collective, then transformers' AutoTokenizer imported (it imports
    torch._dynamo), then ``leave_process_group``; writes the names of the threads still
    alive to ``out_dir/threads-r<rank>.json``."""
    import torch

    host, port = init_method.removeprefix("tcp://").rsplit(":", 1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR=host,
                      MASTER_PORT=port)
    torch.set_num_threads(1)
    from tuckerize.parallel import ParallelContext, init_from_env, leave_process_group

    parallel, _ = init_from_env("cpu")
    total = parallel.all_reduce(torch.ones(2))
    from transformers import AutoTokenizer  # noqa: F401

    leave_process_group(True)
    tasks = Path("/proc/self/task")
    names = sorted((t / "comm").read_text().strip() for t in tasks.iterdir())
    (Path(out_dir) / f"threads-r{rank}.json").write_text(json.dumps(
        {"threads": names, "sum": total.tolist(), "after": ParallelContext.current().world}))


def failing_worker(rank: int, world: int, init_method: str) -> None:
    """Rank 1 raises before the collective that rank 0 waits in (for testing the harness)."""
    import torch
    import torch.distributed as dist

    init_gloo(rank, world, init_method, timeout_s=20)
    if rank == 1:
        raise RuntimeError("rank 1 fails on purpose")
    dist.all_reduce(torch.ones(3))  # never completes: rank 1 is gone

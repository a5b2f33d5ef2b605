"""Spawn real gloo process groups on CPU for distributed tests.

`run_ranks(fn, world_size, *args)` starts `world_size` processes, initializes a gloo world in each
(file store, no ports), calls `fn(rank, world_size, *args)`, and returns the per-rank return values
(anything torch.save can write). A rank that raises, dies, or outlives `timeout` fails the test
with that rank's traceback, and every other rank is killed: a hang fails instead of blocking CI.
"""

from __future__ import annotations

import datetime
import os
import tempfile
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(fn, rank, world_size, init_file, out_dir, args):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"file://{init_file}",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=120),
        )
        result = fn(rank, world_size, *args)
        torch.save(result, os.path.join(out_dir, f"result{rank}.pt"))
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:
        with open(os.path.join(out_dir, f"error{rank}.txt"), "w") as f:
            f.write(traceback.format_exc())
        raise SystemExit(1) from None


def run_ranks(fn, world_size: int, *args, timeout: float = 180.0) -> list:
    """Run fn(rank, world_size, *args) on `world_size` gloo ranks; return their results."""
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        procs = [
            ctx.Process(target=_worker, args=(fn, r, world_size, init_file, tmp, args))
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        failed = None
        while any(p.is_alive() for p in procs):
            if time.monotonic() > deadline:
                failed = f"timed out after {timeout:.0f}s"
                break
            if any(p.exitcode not in (None, 0) for p in procs):
                time.sleep(1.0)  # let the failing rank finish writing its traceback
                failed = "a rank failed"
                break
            time.sleep(0.05)
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join()
        errors = []
        for r in range(world_size):
            path = os.path.join(tmp, f"error{r}.txt")
            if os.path.exists(path):
                errors.append(f"--- rank {r} ---\n" + open(path).read())
        if failed or errors or any(p.exitcode != 0 for p in procs):
            codes = [p.exitcode for p in procs]
            raise RuntimeError(
                f"{failed or 'ranks failed'} (exit codes {codes})\n" + "\n".join(errors)
            )
        return [
            torch.load(os.path.join(tmp, f"result{r}.pt"), weights_only=False)
            for r in range(world_size)
        ]

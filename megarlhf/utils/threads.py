"""Threads per rank: launchers start several ranks on one machine, and each torch process would
otherwise use every core (torchrun sets OMP_NUM_THREADS=1; the deepspeed launcher sets nothing).
"""

from __future__ import annotations

import os


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def threads_per_rank(local_world_size: int, cores: int | None = None) -> int:
    """cores // local ranks, at least 1."""
    cores = available_cores() if cores is None else cores
    return max(1, cores // max(1, local_world_size))


def set_threads_per_rank(env: dict | None = None) -> int:
    """Set OMP_NUM_THREADS and torch's intra-op threads for this rank; returns the count.

    An OMP_NUM_THREADS already in the environment wins (the user or torchrun chose). Otherwise
    the local rank count comes from the launcher's LOCAL_WORLD_SIZE (torchrun) or LOCAL_SIZE
    (deepspeed launcher); a plain process gets every core. Call before torch does heavy work.
    """
    env = os.environ if env is None else env
    if env.get("OMP_NUM_THREADS"):
        n = max(1, int(env["OMP_NUM_THREADS"]))
    else:
        local = int(env.get("LOCAL_WORLD_SIZE") or env.get("LOCAL_SIZE") or 1)
        n = threads_per_rank(local)
        env["OMP_NUM_THREADS"] = str(n)
    import torch

    torch.set_num_threads(n)
    return n

"""Logging set-up for training tools: INFO on rank 0, warnings only elsewhere, DeepSpeed quiet."""

from __future__ import annotations

import logging
import sys


def setup_logging(rank: int, level: int = logging.INFO) -> None:
    """Configure the root logger for one rank (`[rank N] LEVEL name: message`)."""
    logging.basicConfig(
        level=level if rank == 0 else logging.WARNING,
        format=f"[rank {rank}] %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )
    # DeepSpeed logs every init detail at INFO on every rank.
    for name in ("DeepSpeed", "deepspeed"):
        logging.getLogger(name).setLevel(logging.WARNING)

"""Capture and restore every random stream of one rank, for bitwise-exact resume.

Streams: python `random`, numpy's legacy global generator, torch CPU, the current CUDA device
(when CUDA is available), and any named trackers passed in (objects with `get_state()` /
`set_state()`, e.g. `megarlhf.parallel.random.RNGStatesTracker`, the per-TP-rank dropout stream).
Each rank saves its own state (`rng/rank_00003.pt`): ranks differ (TP/PP seeds), so one rank's
state must never be restored on another. The state holds only tensors and plain Python values, so
it loads with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

RNG_DIR = "rng"

logger = logging.getLogger(__name__)


def capture_rng_state(trackers: Mapping[str, Any] | None = None) -> dict:
    """A snapshot of this process's random streams (and of `trackers`, by name)."""
    np_state = np.random.get_state(legacy=False)
    state = {
        "python": random.getstate(),
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "trackers": {name: t.get_state() for name, t in (trackers or {}).items()},
    }
    return state


def restore_rng_state(state: dict, trackers: Mapping[str, Any] | None = None) -> None:
    """Put every stream back as `capture_rng_state` saw it.

    Raises ValueError if a tracker is missing from the state. A CUDA stream captured on a machine
    without CUDA (or the reverse) cannot be restored; that is logged as a warning.
    """
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": n["bit_generator"],
            "state": {"key": n["key"].numpy().astype(np.uint32), "pos": n["pos"]},
            "has_gauss": n["has_gauss"],
            "gauss": n["gauss"],
        }
    )
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    elif (state["cuda"] is None) == torch.cuda.is_available():
        logger.warning(
            "RNG state was captured %s CUDA; the CUDA stream is not restored",
            "with" if state["cuda"] is not None else "without",
        )
    for name, tracker in (trackers or {}).items():
        if name not in state["trackers"]:
            raise ValueError(f"RNG state has no tracker {name!r} (has {list(state['trackers'])})")
        tracker.set_state(state["trackers"][name])


def rng_file(ckpt_dir: str | Path, rank: int) -> Path:
    """`<ckpt_dir>/rng/rank_{rank:05d}.pt` (rank: global rank)."""
    return Path(ckpt_dir) / RNG_DIR / f"rank_{rank:05d}.pt"


def save_rng_state(ckpt_dir: str | Path, rank: int, trackers=None) -> Path:
    """Write this rank's `capture_rng_state(trackers)`; returns the file (for save_checkpoint)."""
    path = rng_file(ckpt_dir, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(capture_rng_state(trackers), path)
    return path


def load_rng_state(ckpt_dir: str | Path, rank: int, trackers=None) -> None:
    """Restore this rank's streams from `rng_file(ckpt_dir, rank)`."""
    path = rng_file(ckpt_dir, rank)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no RNG state for rank {rank} in this checkpoint")
    restore_rng_state(torch.load(path, weights_only=True), trackers)

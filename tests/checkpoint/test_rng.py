"""RNG capture/restore: python, numpy (including the cached Gaussian), torch and named trackers,
in memory and through a per-rank file loaded with weights_only=True."""

import random

import numpy as np
import pytest
import torch

from megarlhf.checkpoint.rng import (
    capture_rng_state,
    load_rng_state,
    restore_rng_state,
    rng_file,
    save_rng_state,
)
from megarlhf.parallel.random import RNGStatesTracker


def _draws(tracker):
    with tracker.fork():
        tp = torch.rand(3).tolist()
    return (
        [random.random(), random.gauss(0, 1), random.gauss(0, 1)],
        [np.random.rand(), np.random.randn(), np.random.randint(1 << 30)],
        torch.rand(3).tolist() + torch.randn(3).tolist(),
        tp,
    )


def _seed_and_warm(tracker):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    random.gauss(0, 1)  # leaves a cached second Gaussian in python's state
    np.random.randn()  # and in numpy's
    with tracker.fork():
        torch.rand(5)


def test_round_trip_in_memory():
    tracker = RNGStatesTracker(seed=11)
    _seed_and_warm(tracker)
    state = capture_rng_state({"tp": tracker})
    first = _draws(tracker)
    _draws(tracker)  # move every stream on
    restore_rng_state(state, {"tp": tracker})
    assert _draws(tracker) == first


def test_round_trip_through_a_rank_file(tmp_path):
    tracker = RNGStatesTracker(seed=12)
    _seed_and_warm(tracker)
    path = save_rng_state(tmp_path, 3, {"tp": tracker})
    assert path == rng_file(tmp_path, 3) == tmp_path / "rng" / "rank_00003.pt"
    first = _draws(tracker)
    random.seed(99), np.random.seed(99), torch.manual_seed(99)
    load_rng_state(tmp_path, 3, {"tp": tracker})  # weights_only=True inside
    assert _draws(tracker) == first
    with pytest.raises(FileNotFoundError, match="no RNG state for rank 4"):
        load_rng_state(tmp_path, 4)
    with pytest.raises(ValueError, match="RNG state has no tracker 'other'"):
        load_rng_state(tmp_path, 3, {"other": tracker})

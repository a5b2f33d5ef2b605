"""Per-rank random streams for dropout under tensor parallelism.

Activations that are replicated across TP ranks (embeddings, residual branches) must see the *same*
dropout mask on every TP rank, or the replicas diverge; activations that are sharded (attention
probabilities of this rank's heads) must see *different* masks, or the heads are correlated. The
default torch generator is seeded identically across a TP group (`default_seed`); the tracker holds
a second, per-TP-rank stream that a model enters with `tracker.fork()` around sharded dropout.
"""

from __future__ import annotations

import contextlib

import torch

from megarlhf.parallel.state import ParallelState

# Offset of the tensor-parallel stream from the base seed (Megatron uses the same constant).
TP_SEED_OFFSET = 2718


def default_seed(seed: int, ps: ParallelState) -> int:
    """Seed of the default generator: equal across TP ranks, different per pipeline stage."""
    return seed + 100 * ps.pp_rank


def tensor_parallel_seed(seed: int, ps: ParallelState) -> int:
    """Seed of the sharded-region stream: different on every TP rank and pipeline stage."""
    return seed + TP_SEED_OFFSET + ps.tp_rank + 100 * ps.pp_rank


class RNGStatesTracker:
    """A named random stream that can be entered temporarily (CPU and, if present, CUDA)."""

    def __init__(self, seed: int):
        self._state = self._make(seed)

    @staticmethod
    def _make(seed: int) -> dict:
        saved = _get_global()
        torch.manual_seed(seed)
        state = _get_global()
        _set_global(saved)
        return state

    def get_state(self) -> dict:
        return dict(self._state)

    def set_state(self, state: dict) -> None:
        self._state = dict(state)

    @contextlib.contextmanager
    def fork(self):
        """Run the body on this stream; the default stream is left exactly as it was."""
        saved = _get_global()
        _set_global(self._state)
        try:
            yield
        finally:
            self._state = _get_global()
            _set_global(saved)


def _get_global() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_global(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])

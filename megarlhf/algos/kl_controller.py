"""KL coefficient controllers (Ziegler et al., 2019): fixed beta, or adaptive toward a target KL.

The adaptive rule, after each rollout of `n_samples` responses with mean per-sequence KL `kl`:

    error = clip(kl / target - 1, -0.2, 0.2)
    beta <- beta * (1 + error * n_samples / horizon)

The controller state is just beta, so it is a pure function plus a small dataclass that the
trainer checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass


def adaptive_kl_update(
    beta: float, kl: float, n_samples: int, target: float, horizon: int
) -> float:
    """One adaptive step; returns the new beta (the old one is not modified)."""
    error = min(max(kl / target - 1.0, -0.2), 0.2)
    return beta * (1.0 + error * n_samples / horizon)


@dataclass
class KLController:
    """beta, plus the rule that updates it (`target` None: fixed)."""

    # Current coefficient.
    beta: float
    # Target mean per-sequence KL for the adaptive rule; None keeps beta fixed.
    target: float | None = None
    # Samples over which the adaptive rule closes the gap.
    horizon: int = 10000

    def update(self, kl: float, n_samples: int) -> None:
        if self.target is not None:
            self.beta = adaptive_kl_update(self.beta, kl, n_samples, self.target, self.horizon)

    def state_dict(self) -> dict:
        return {"beta": self.beta, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict) -> None:
        self.beta, self.target, self.horizon = state["beta"], state["target"], state["horizon"]

"""Sampling configuration (generation, PPO rollouts)."""

from __future__ import annotations

from dataclasses import dataclass

from megarlhf.config.loader import check


@dataclass
class GenerationConfig:
    """Sampling settings. Log-probs are always those of the temperature-scaled distribution."""

    # Tokens to generate at most per prompt.
    max_new_tokens: int = 32
    # Softmax temperature; 0 means greedy.
    temperature: float = 1.0
    # Keep only the k most likely tokens (0: off).
    top_k: int = 0
    # Keep the smallest set of tokens with cumulative probability >= top_p (1.0: off).
    top_p: float = 1.0
    # Seed of the sampling generator (same on every TP rank so they agree).
    seed: int = 0

    def __post_init__(self) -> None:
        check(self.max_new_tokens >= 1, "max_new_tokens", "must be >= 1")
        check(self.temperature >= 0.0, "temperature", "must be >= 0")
        check(self.top_k >= 0, "top_k", "must be >= 0")
        check(0.0 < self.top_p <= 1.0, "top_p", "must be in (0, 1]")

"""A rule reward for the PPO learning tests: the fraction of response tokens in a target set."""

from __future__ import annotations

# Token ids the policy is rewarded for (1/8 of the 512-token vocabulary: a random policy hits
# them about 12% of the time, so the signal is there from the first step).
TARGET = frozenset(range(64, 128))


def target_fraction(prompts: list[list[int]], responses: list[list[int]]) -> list[float]:
    return [sum(t in TARGET for t in r) / max(len(r), 1) for r in responses]

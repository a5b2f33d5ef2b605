"""Simulated labelers (real sentiment models) and the statistics the paper reports with them.

Labelers score a text; higher is better:
  VADER    `vaderSentiment`'s compound score in [-1, 1] (the demo's training labeler);
  TextBlob `textblob`'s pattern-lexicon polarity in [-1, 1] (the held-out labeler; its lexicon
           ships inside the package, nothing is downloaded).

A *noisy* labeler adds independent N(0, sigma^2) noise to every score it gives, so two noisy
labelers ranking the same responses disagree on some pairs, like InstructGPT's human labelers
(72.6 +- 1.5% inter-labeler agreement on training labelers). `calibrate_noise` finds the sigma at
which two independent noisy labelers agree on a target fraction of the pairs of given score
groups, by bisection on a Monte-Carlo estimate with fixed seeds (so it is deterministic).

Statistics are pure functions of score arrays: `win_rate` (ties count half, as in the paper's
preference comparisons), `pair_accuracy` (a model's scores against a labeler's on every
within-prompt pair the labeler does not tie), `pairwise_agreement`.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np


@lru_cache(maxsize=1)
def _vader():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def vader_scores(texts: Sequence[str]) -> np.ndarray:
    """VADER compound score of each text."""
    analyzer = _vader()
    return np.array([analyzer.polarity_scores(t)["compound"] for t in texts], dtype=np.float64)


def textblob_scores(texts: Sequence[str]) -> np.ndarray:
    """TextBlob polarity of each text."""
    from textblob import TextBlob

    return np.array([TextBlob(t).sentiment.polarity for t in texts], dtype=np.float64)


LABELERS = {"vader": vader_scores, "textblob": textblob_scores}


def noisy(scores: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """One noisy labeler's view of `scores` (independent noise per score)."""
    return scores + sigma * rng.standard_normal(scores.shape)


def _pairs(k: int) -> tuple[np.ndarray, np.ndarray]:
    i, j = np.triu_indices(k, 1)
    return i, j


def pairwise_agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Fraction of within-group pairs that two labelers order the same way.

    Args:
        a, b: [groups, k] scores of the same responses by two labelers (no ties expected: noisy).
    """
    i, j = _pairs(a.shape[1])
    return float(np.mean(np.sign(a[:, i] - a[:, j]) == np.sign(b[:, i] - b[:, j])))


def calibrate_noise(
    scores: np.ndarray, target: float = 0.73, seed: int = 0, draws: int = 8, iters: int = 40
) -> tuple[float, float]:
    """Sigma at which two noisy labelers agree on `target` of the pairs of `scores`.

    Args:
        scores: [groups, k] noise-free scores.
        target: wanted agreement in (0.5, 1).
    Returns:
        (sigma, the agreement measured at that sigma).
    Raises:
        ValueError: the target is not reachable (ties make even tiny noise disagree too often).
    """
    if not 0.5 < target < 1.0:
        raise ValueError(f"target agreement must be in (0.5, 1), got {target}")

    def agreement(sigma: float) -> float:
        rng = np.random.default_rng(seed)
        vals = [
            pairwise_agreement(noisy(scores, sigma, rng), noisy(scores, sigma, rng))
            for _ in range(draws)
        ]
        return float(np.mean(vals))

    lo, hi = 1e-6, 10.0 * float(scores.std() + 1e-6)
    if agreement(lo) < target:
        raise ValueError(
            f"agreement {agreement(lo):.3f} at vanishing noise is below the target {target}: "
            "too many tied scores"
        )
    for _ in range(iters):
        mid = (lo + hi) / 2
        if agreement(mid) > target:
            lo = mid
        else:
            hi = mid
    sigma = (lo + hi) / 2
    return sigma, agreement(sigma)


def ranking_of(scores: np.ndarray) -> list[int]:
    """1-based ranks (1 = highest score) of one group's scores."""
    order = np.argsort(-scores, kind="stable")
    ranks = np.empty(len(scores), dtype=np.int64)
    ranks[order] = np.arange(1, len(scores) + 1)
    return ranks.tolist()


def win_rate(a: np.ndarray, b: np.ndarray) -> float:
    """How often a beats b, element by element; ties count one half."""
    a, b = np.asarray(a), np.asarray(b)
    return float(np.mean((a > b) + 0.5 * (a == b)))


def pair_accuracy(model: list[np.ndarray], labeler: list[np.ndarray]) -> tuple[float, int]:
    """Accuracy of a model's scores on every within-group pair the labeler orders strictly.

    Args:
        model, labeler: per group, the scores of the group's responses (groups may differ in k).
    Returns:
        (accuracy, the number of pairs counted); a model tie counts one half.
    """
    right, n = 0.0, 0
    for m, lab in zip(model, labeler, strict=True):
        i, j = _pairs(len(m))
        d_lab = np.sign(lab[i] - lab[j])
        d_mod = np.sign(m[i] - m[j])
        keep = d_lab != 0
        right += float(np.sum((d_mod == d_lab)[keep]) + 0.5 * np.sum((d_mod == 0)[keep]))
        n += int(keep.sum())
    return (right / n if n else float("nan")), n

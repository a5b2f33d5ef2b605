"""Labelers and their statistics against hand-computed values and independent estimates."""

import numpy as np
import pytest

from megarlhf.eval import labelers


def test_real_labelers_order_obvious_sentiment():
    texts = ["O sweet love, how fair and happy thou art!", "Thou vile villain, I hate thee."]
    v, t = labelers.vader_scores(texts), labelers.textblob_scores(texts)
    assert v[0] > 0.5 > -0.5 > v[1]
    assert t[0] > 0 > t[1]


def test_win_rate_counts_ties_half():
    assert labelers.win_rate([1, 2, 3, 0], [0, 2, 5, -1]) == pytest.approx((1 + 0.5 + 0 + 1) / 4)


def test_pair_accuracy_by_hand():
    # group 1: labeler 3 > 2 > 1, model agrees on (0,1) and (1,2), wrong on (0,2)? no: model
    # [2, 1, 3] vs labeler [3, 2, 1]: pairs (0,1) right, (0,2) wrong, (1,2) wrong.
    # group 2: labeler ties its pair -> not counted.
    acc, n = labelers.pair_accuracy(
        [np.array([2.0, 1.0, 3.0]), np.array([0.0, 1.0])],
        [np.array([3.0, 2.0, 1.0]), np.array([0.5, 0.5])],
    )
    assert n == 3 and acc == pytest.approx(1 / 3)
    # A model tie on a strict pair counts one half.
    acc, n = labelers.pair_accuracy([np.array([1.0, 1.0])], [np.array([0.0, 1.0])])
    assert (acc, n) == (0.5, 1)


def test_ranking_of():
    assert labelers.ranking_of(np.array([0.1, 0.9, -0.3, 0.5])) == [3, 1, 4, 2]


def test_calibrated_noise_gives_target_agreement_on_fresh_draws():
    rng = np.random.default_rng(5)
    scores = np.round(rng.uniform(-1, 1, size=(400, 4)), 1)  # some ties, like VADER's zeros
    sigma, agree = labelers.calibrate_noise(scores, 0.73, seed=1)
    assert agree == pytest.approx(0.73, abs=0.01)
    # An independent estimate with other seeds and more draws.
    other = np.random.default_rng(99)
    fresh = np.mean(
        [
            labelers.pairwise_agreement(
                labelers.noisy(scores, sigma, other), labelers.noisy(scores, sigma, other)
            )
            for _ in range(30)
        ]
    )
    assert fresh == pytest.approx(0.73, abs=0.015)
    # More noise, less agreement.
    assert labelers.calibrate_noise(scores, 0.65, seed=1)[0] > sigma


def test_calibration_refuses_unreachable_targets():
    tied = np.zeros((50, 4))  # every pair tied: agreement 0.5 whatever sigma
    with pytest.raises(ValueError, match="too many tied"):
        labelers.calibrate_noise(tied, 0.73)
    with pytest.raises(ValueError, match="target agreement"):
        labelers.calibrate_noise(tied, 1.2)

# Copyright lit-qa authors. Licensed under the Apache License 2.0.
"""The paired bootstrap (`lit_qa.evaluation.bootstrap`): exact on a constant difference, covering the true mean
about as often as it claims, deterministic for a seed, and narrowed by pairing."""

from __future__ import annotations

import numpy as np
import pytest

from lit_qa.evaluation.bootstrap import paired_bootstrap


def test_a_constant_difference_has_a_zero_width_interval_at_that_value():
    b = np.random.default_rng(0).uniform(0, 100, size=50)
    mean, low, high = paired_bootstrap(b + 7.25, b, samples=500)
    assert mean == pytest.approx(7.25) and low == high == pytest.approx(7.25)
    assert paired_bootstrap([1.0], [0.0]) == (1.0, 1.0, 1.0)  # one question: nothing to resample


def test_the_interval_covers_the_true_mean_about_95_percent_of_the_time():
    rng = np.random.default_rng(1)
    covered, widths = 0, []
    for trial in range(100):
        diffs = rng.normal(2.0, 1.0, size=100)  # symmetric noise around a true mean difference of 2
        mean, low, high = paired_bootstrap(diffs, np.zeros(100), samples=1000, seed=trial)
        assert low < mean < high and mean == pytest.approx(diffs.mean())
        covered += low <= 2.0 <= high
        widths.append(high - low)
    assert 88 <= covered <= 99
    # About 2 * 1.96 standard errors: 0.39 for a standard deviation of 1 over 100 questions.
    assert np.mean(widths) == pytest.approx(2 * 1.96 / 10, rel=0.1)


def test_same_seed_same_interval_and_pairing_cancels_what_both_share():
    rng = np.random.default_rng(2)
    difficulty = rng.uniform(0, 100, size=400)  # most of the spread is which questions are easy, for both runs
    a, b = difficulty + rng.normal(1.0, 2.0, size=400), difficulty
    first = paired_bootstrap(a, b, seed=3)
    assert paired_bootstrap(list(a), list(b), seed=3) == first
    other = paired_bootstrap(a, b, seed=4)
    assert other[0] == first[0] and other[1:] != first[1:]
    # Paired: about 2 * 1.96 * 2 / sqrt(400) = 0.39 wide, not the ~5.7 of the runs' own spread.
    assert first[2] - first[1] == pytest.approx(0.39, rel=0.15)


def test_mismatched_or_empty_scores_are_refused():
    for a, b in (([1.0, 2.0], [1.0]), ([], []), ([[1.0]], [[1.0]])):
        with pytest.raises(ValueError, match="equally long, non-empty"):
            paired_bootstrap(a, b)
    with pytest.raises(ValueError, match="level"):
        paired_bootstrap([1.0], [0.0], level=95)

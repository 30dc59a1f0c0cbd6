"""Bootstrap intervals of means over queries, against values derived by hand."""

from __future__ import annotations

import math

import pytest
import torch

from lever_trainer.stats import bootstrap_means, interval, mean_interval, paired_difference


def test_constant_values_have_a_point_interval() -> None:
    assert mean_interval([0.75] * 40) == (0.75, 0.75, 0.75)


def test_the_interval_of_a_proportion_matches_the_normal_approximation() -> None:
    # 90 of 100 correct: standard error sqrt(0.9 * 0.1 / 100) = 0.03, so the 95 % interval
    # is about 0.9 -/+ 1.96 * 0.03 = [0.8412, 0.9588] (the bootstrap's own discreteness
    # and skew move the ends by about a hundredth at most)
    mean, low, high = mean_interval([1.0] * 90 + [0.0] * 10, resamples=20000)
    assert mean == pytest.approx(0.9)
    assert low == pytest.approx(0.9 - 1.96 * 0.03, abs=0.012)
    assert high == pytest.approx(0.9 + 1.96 * 0.03, abs=0.012)


def test_a_paired_difference_cancels_what_both_share() -> None:
    # b = a except on 4 of 200 queries, where a is right and b wrong: the difference is
    # 4 / 200 = 0.02 and can never be negative, whichever queries are drawn
    a = [1.0] * 150 + [0.0] * 50
    b = list(a)
    for i in (3, 70, 120, 149):
        b[i] = 0.0
    diff, low, high = paired_difference(a, b)
    assert diff == pytest.approx(0.02)
    assert low >= 0.0 and high > diff
    # unpaired, the same two means would overlap widely
    assert mean_interval(a)[1] < mean_interval(b)[2]


def test_a_stratified_bootstrap_averages_group_means_with_their_own_spread() -> None:
    # two groups: the replicates' mean is the mean of the group means, (0.5 + 0.9) / 2,
    # and their variance (0.25 / 100 + 0.09 / 400) / 4 (each group's mean varies on its own)
    g1 = [1.0] * 50 + [0.0] * 50
    g2 = [1.0] * 360 + [0.0] * 40
    reps = bootstrap_means([g1, g2], resamples=20000)
    assert float(reps.mean()) == pytest.approx(0.7, abs=0.002)
    expected_sd = math.sqrt((0.25 / 100 + 0.09 / 400) / 4)
    assert float(reps.std()) == pytest.approx(expected_sd, rel=0.05)


def test_intervals_are_reproducible_and_percentiles() -> None:
    reps = torch.arange(1, 1001, dtype=torch.float64)  # 1..1000
    low, high = interval(reps)
    # torch.quantile interpolates linearly: position 0.025 * 999 = 24.975 -> 25.975
    assert low == pytest.approx(25.975)
    assert high == pytest.approx(975.025)
    values = [0.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0]
    assert mean_interval(values) == mean_interval(values)


def test_paired_values_must_have_one_length() -> None:
    with pytest.raises(ValueError, match="different lengths"):
        paired_difference([1.0, 0.0], [1.0])

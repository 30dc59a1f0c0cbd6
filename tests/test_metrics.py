"""Offline selection metrics (docs/algorithm.md#validation) against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from lever_trainer.metrics import (
    average_ranks,
    clearly_better,
    mean_interval,
    paired_difference,
    selection_metrics,
    spearman,
    wilson_interval,
)

T = torch.tensor


def test_average_ranks_share_ties() -> None:
    # values 3, 1, 3, 2 -> sorted 1(0) 2(1) 3,3 (2 and 3 -> 2.5)
    ranks = average_ranks(T([[3.0, 1.0, 3.0, 2.0]]), torch.ones(1, 4, dtype=torch.bool))
    assert ranks.tolist() == [[2.5, 0.0, 2.5, 1.0]]


def test_spearman_by_hand() -> None:
    mask = torch.ones(3, 4, dtype=torch.bool)
    mask[2, 3] = False
    a = T([[1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0], [5.0, 5.0, 5.0, 0.0]])
    b = T([[10.0, 20.0, 30.0, 40.0], [4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 0.0]])
    rho, defined = spearman(a, b, mask)
    assert rho[0].item() == pytest.approx(1.0)
    assert rho[1].item() == pytest.approx(-1.0)
    assert defined.tolist() == [True, True, False]  # row 3: a is constant on its real entries
    # ranks a = [0, 1, 2, 3], b = [1, 0, 3, 2]: d^2 sum = 4 -> 1 - 6*4/(4*15) = 0.6
    rho, _ = spearman(T([[1.0, 2, 3, 4]]), T([[2.0, 1, 4, 3]]), torch.ones(1, 4, dtype=torch.bool))
    assert rho.item() == pytest.approx(0.6)


def test_selection_metrics_by_hand() -> None:
    logprobs = T([[-1.0, -0.5, -3.0], [-2.0, -2.0, -9.0]])
    raw = T([[0.0, 1.0, 2.0], [2.0, 0.5, 7.0]])
    correct = T([[0.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    mask = T([[True, True, True], [True, True, False]])
    m = selection_metrics(logprobs, raw, correct, mask)
    values = {k: v for k, (v, _) in m.items()}
    # query 1: pick index 1 (reward 1), random mean 1, oracle 2 -> gain 0 (0/1)
    # query 2: tie -> first index 0 (reward 2), random 1.25, oracle 2 -> gain 1
    assert values["policy_reward@1"].tolist() == [1.0, 2.0]
    assert values["policy_correct@1"].tolist() == [1.0, 1.0]
    assert values["random_reward"].tolist() == [1.0, 1.25]
    assert values["oracle_reward"].tolist() == [2.0, 2.0]
    assert values["normalized_gain"].tolist() == pytest.approx([0.0, 1.0])
    assert m["normalized_gain"][1].tolist() == [True, True]


def test_normalized_gain_undefined_when_oracle_equals_random() -> None:
    m = selection_metrics(
        T([[0.0, -1.0]]), T([[1.0, 1.0]]), T([[1.0, 1.0]]), torch.ones(1, 2, dtype=torch.bool)
    )
    assert m["normalized_gain"][1].tolist() == [False]
    assert m["spearman"][1].tolist() == [False]


# ------------------------------------------------------------ uncertainty of a mean
def test_wilson_interval_by_hand() -> None:
    # 9 of 10: p = 0.9, z^2 = 3.8415; centre (0.9 + 0.19207) / 1.38415 = 0.78899,
    # half 1.95996 / 1.38415 * sqrt(0.009 + 0.0096036) = 0.19314 -> [0.5958, 0.9821]
    low, high = wilson_interval(9, 10)
    assert low == pytest.approx(0.59585, abs=1e-4) and high == pytest.approx(0.98212, abs=1e-4)
    # 0 of 4: centre = half = (3.8415 / 8) / 1.96037 = 0.24495 -> [0, 0.4899]
    low, high = wilson_interval(0, 4)
    assert low == 0.0 and high == pytest.approx(0.48989, abs=1e-4)
    assert all(math.isnan(v) for v in wilson_interval(0, 0))


def test_mean_interval_normal_and_wilson() -> None:
    # 1, 2, 3, 4: mean 2.5, sd sqrt(5/3) = 1.29099, half 1.95996 * 1.29099 / 2 = 1.26515
    mean, low, high = mean_interval(T([1.0, 2.0, 3.0, 4.0]))
    assert mean == 2.5
    assert (low, high) == pytest.approx((1.23485, 3.76515), abs=1e-4)
    # 0/1 values are a proportion: the Wilson interval of 9 of 10
    mean, low, high = mean_interval(T([1.0] * 9 + [0.0]))
    assert mean == pytest.approx(0.9) and (low, high) == pytest.approx((0.59585, 0.98212), abs=1e-4)
    # undefined queries (NaN) do not count; one value has no spread
    mean, low, high = mean_interval(T([float("nan"), 2.5]))
    assert mean == 2.5 and math.isnan(low) and math.isnan(high)


def test_paired_difference_by_hand() -> None:
    new, old = T([1.0, 1.0, 0.0, 1.0, 1.0]), T([0.0, 1.0, 0.0, 0.0, 1.0])
    # d = 1, 0, 0, 1, 0: mean 0.4, sd sqrt((2 * 0.36 + 3 * 0.16) / 4) = sqrt(0.3),
    # half 1.95996 * sqrt(0.3) / sqrt(5) = 0.48009 > 0.4: within the noise
    mean, half, n = paired_difference(new, old)
    assert (mean, n) == (pytest.approx(0.4), 5) and half == pytest.approx(0.48009, abs=1e-4)
    better, diff, _, _ = clearly_better(new, old)
    assert not better and diff == pytest.approx(0.4)
    # the same gain on every query has no noise: clearly better, and worse when smaller wins
    base = T([0.2, 0.5, 0.9, 0.4])
    assert clearly_better(base + 0.05, base)[0]
    assert not clearly_better(base + 0.05, base, larger_is_better=False)[0]
    assert clearly_better(base - 0.05, base, larger_is_better=False)[0]
    # nine of ten queries gained 1, one lost 1: mean 0.8, sd sqrt(0.4) -> half 0.3920
    new, old = T([1.0] * 9 + [0.0]), T([0.0] * 9 + [1.0])
    better, diff, half, n = clearly_better(new, old)
    assert better and diff == pytest.approx(0.8) and half == pytest.approx(0.39199, abs=1e-4)
    # a query undefined for either side is left out; one pair is never "clearly better"
    assert paired_difference(T([1.0, float("nan")]), T([0.0, 0.0]))[2] == 1
    assert not clearly_better(T([1.0, float("nan")]), T([0.0, 0.0]))[0]

"""Offline selection metrics (docs/algorithm.md#validation) against hand-computed values."""

from __future__ import annotations

import pytest
import torch

from lever_trainer.metrics import average_ranks, selection_metrics, spearman

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

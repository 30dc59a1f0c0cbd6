"""The pure numbers of RCE and GRPO (docs/algorithm.md), against values worked out by hand.

Each expected value below is derived in the comment next to it from the formulas of docs/algorithm.md
formula, not taken from the code's output.
"""

from __future__ import annotations

import math

import pytest
import torch

from lever_trainer import losses as L

T = torch.tensor
ALL2 = torch.ones(1, 2, dtype=torch.bool)


# -- sequence log-probs ----------------------------------------------------------
def test_sequence_logprob_sums_steps() -> None:
    # step 1: logits [0, ln 3] -> p = [1/4, 3/4]; label 1 -> ln 0.75
    # step 2: logits [ln 2, 0, -100] -> p(label 0) = 2 / (2 + 1 + e^-100)
    logits = T([[[0.0, math.log(3.0), -1e9], [math.log(2.0), 0.0, -100.0]]])
    got = L.sequence_logprobs(logits, T([[1, 0]]))
    expected = math.log(0.75) + math.log(2.0 / (3.0 + math.exp(-100.0)))
    assert got.item() == pytest.approx(expected, abs=1e-6)


# -- RCE temperature schedule ------------------------------------------------------
def test_rce_temperature_is_linear_over_steps() -> None:
    # T = 5: tau_i = 2 + (0.5 - 2) * i / 4 = 2, 1.625, 1.25, 0.875, 0.5
    taus = [L.rce_temperature(i, 5, 2.0, 0.5) for i in range(5)]
    assert taus == pytest.approx([2.0, 1.625, 1.25, 0.875, 0.5])
    assert L.rce_temperature(9, 5, 2.0, 0.5) == pytest.approx(0.5)  # min(1, i/(T-1))


@pytest.mark.parametrize("total", [0, 1])
def test_rce_temperature_single_step_uses_end(total: int) -> None:
    assert L.rce_temperature(0, total, 2.0, 0.5) == 0.5


# -- RCE loss ---------------------------------------------------------------------
def test_rce_loss_by_hand() -> None:
    # logprobs [-1, -2] -> CE [1, 2]; rewards [0, 1], tau 1:
    # w = [1, e] / (1 + e); loss = (1 * 1 + e * 2) / (1 + e)
    e = math.e
    got = L.rce_loss(T([[-1.0, -2.0]]), T([[0.0, 1.0]]), ALL2, 1.0)
    assert got.item() == pytest.approx((1 + 2 * e) / (1 + e), abs=1e-6)
    # tau 0.5 doubles the reward gap: w = [1, e^2] / (1 + e^2)
    got = L.rce_loss(T([[-1.0, -2.0]]), T([[0.0, 1.0]]), ALL2, 0.5)
    assert got.item() == pytest.approx((1 + 2 * e**2) / (1 + e**2), abs=1e-6)


def test_rce_loss_averages_queries_and_ignores_padding() -> None:
    # query A: one candidate, CE 3 -> loss 3 (weight 1)
    # query B: equal rewards -> uniform weights -> loss (1 + 5) / 2 = 3 ... use CE 1 and 3 -> 2
    # batch loss = (3 + 2) / 2 = 2.5; the padded slot of A (logprob -1000) must not count
    logprobs = T([[-3.0, -1000.0], [-1.0, -3.0]])
    rewards = T([[0.0, 99.0], [0.5, 0.5]])
    mask = T([[True, False], [True, True]])
    assert L.rce_loss(logprobs, rewards, mask, 1.0).item() == pytest.approx(2.5)


# -- advantages ---------------------------------------------------------------------
def test_advantages_zscore_with_unbiased_std() -> None:
    # r = [1, 2, 3]: mean 2, unbiased std 1 -> [-1, 0, 1]
    adv = L.group_advantages(T([[1.0, 2.0, 3.0]]), torch.ones(1, 3, dtype=torch.bool))
    assert adv[0].tolist() == pytest.approx([-1.0, 0.0, 1.0])


def test_advantages_std_floor() -> None:
    # r = [1, 1.1]: std = 0.0707 < 0.1 -> denominator 0.1: (+-0.05) / 0.1 = +-0.5
    adv = L.group_advantages(T([[1.0, 1.1]]), ALL2)
    assert adv[0].tolist() == pytest.approx([-0.5, 0.5], abs=1e-5)


def test_advantages_clip_at_five() -> None:
    # r = [1, 0 x 36]: mean 1/37, std = sqrt(1332 / (37^2 * 36)) = 0.164399,
    # z_0 = (36/37) / 0.164399 = 5.918 -> clipped to 5; the zeros get -(1/37)/0.164399
    r = torch.zeros(1, 37)
    r[0, 0] = 1.0
    adv = L.group_advantages(r, torch.ones(1, 37, dtype=torch.bool))
    std = math.sqrt(1332 / (37**2 * 36))
    assert adv[0, 0].item() == pytest.approx(5.0)
    assert adv[0, 1].item() == pytest.approx(-(1 / 37) / std, abs=1e-5)


def test_advantages_single_candidate_and_padding_are_zero() -> None:
    adv = L.group_advantages(T([[4.0, 7.0]]), T([[True, False]]))
    assert adv.tolist() == [[0.0, 0.0]]


# -- GRPO loss and KL ------------------------------------------------------------------
def test_grpo_clip_and_kl_by_hand() -> None:
    # A = [1, -1]; ratios [1.5, 0.5] (eps 0.2):
    #   j=1: min(1.5 * 1, 1.2 * 1) = 1.2;  j=2: min(0.5 * -1, 0.8 * -1) = -0.8
    #   ppo = -mean(1.2, -0.8) = -0.2
    #   kl = mean(1.5 - 1 - ln 1.5, 0.5 - 1 - ln 0.5) = mean(0.0945349, 0.1931472)
    new = T([[math.log(1.5), math.log(0.5)]])
    old = torch.zeros(1, 2)
    out = L.grpo_loss(new, old, T([[1.0, -1.0]]), ALL2, clip_epsilon=0.2, kl_beta=0.1)
    kl = ((0.5 - math.log(1.5)) + (-0.5 - math.log(0.5))) / 2
    assert out["ppo"].item() == pytest.approx(-0.2, abs=1e-6)
    assert out["kl"].item() == pytest.approx(kl, abs=1e-6)
    assert out["loss"].item() == pytest.approx(-0.2 + 0.1 * kl, abs=1e-6)
    assert out["mean_ratio"].item() == pytest.approx(1.0)
    ppo_only = L.grpo_loss(new, old, T([[1.0, -1.0]]), ALL2, 0.2, 0.1, use_kl=False)
    assert ppo_only["loss"].item() == pytest.approx(-0.2, abs=1e-6)


def test_grpo_batch_averages_per_query_values() -> None:
    # query 1: one kept candidate, ratio 1.5, A = 1 -> ppo -1.2, kl 0.5 - ln 1.5
    # query 2: three candidates at ratio 1, A = [1, 0, -1] -> ppo 0, kl 0
    # batch: ppo = (-1.2 + 0) / 2 = -0.6 (a candidate-weighted mean would give -0.3)
    new = T([[math.log(1.5), 0.0, 0.0], [0.0, 0.0, 0.0]])
    adv = T([[1.0, 0.0, 0.0], [1.0, 0.0, -1.0]])
    mask = T([[True, False, False], [True, True, True]])
    out = L.grpo_loss(new, torch.zeros(2, 3), adv, mask, 0.2, 0.1)
    assert out["ppo"].item() == pytest.approx(-0.6, abs=1e-6)
    assert out["kl"].item() == pytest.approx((0.5 - math.log(1.5)) / 2, abs=1e-6)


# -- adaptive KL weight ---------------------------------------------------------------------
@pytest.mark.parametrize(
    ("beta", "kl", "expected"),
    [
        (0.1, 0.2, 0.15),  # kl > 0.1: x 1.5
        (0.1, 0.005, 0.1 / 1.5),  # kl < 0.01: / 1.5
        (0.1, 0.05, 0.1),  # in between: unchanged
        (0.1, 0.1, 0.1),  # the bounds themselves do not move it
        (0.1, 0.01, 0.1),
        (9.0, 1.0, 10.0),  # 13.5 clamped to 10
        (0.0012, 0.0, 0.001),  # 0.0008 clamped to 0.001
    ],
)
def test_adapt_kl_beta(beta: float, kl: float, expected: float) -> None:
    assert L.adapt_kl_beta(beta, kl) == pytest.approx(expected)


# -- curriculum top-k ------------------------------------------------------------------------
def test_top_k_breaks_ties_by_lower_index() -> None:
    r = T([[0.5, 0.7, 0.7, 0.1, 0.7]])
    m = torch.ones(1, 5, dtype=torch.bool)
    assert L.top_k_mask(r, m, 3).tolist() == [[False, True, True, False, True]]
    assert L.top_k_mask(r, m, 2).tolist() == [[False, True, True, False, False]]


def test_top_k_small_groups_keep_all_and_padding_never_kept() -> None:
    r = T([[0.1, 0.2, 9.0], [3.0, 1.0, 2.0]])
    m = T([[True, True, False], [True, True, True]])
    assert L.top_k_mask(r, m, 3).tolist() == [[True, True, False], [True, True, True]]
    assert L.top_k_mask(r, m, 1).tolist() == [[False, True, False], [True, False, False]]


def test_masked_std_is_unbiased() -> None:
    # [2, 4, 4, 4, 5, 5, 7, 9]: mean 5, sum of squares 32, unbiased var 32/7
    v = T([[2.0, 4, 4, 4, 5, 5, 7, 9, 100]])
    m = torch.ones(1, 9, dtype=torch.bool)
    m[0, 8] = False
    assert L.masked_std(v, m).item() == pytest.approx(math.sqrt(32 / 7))
    assert L.masked_mean(v, m).item() == pytest.approx(5.0)


def test_grpo_log_ratio_is_bounded_where_exp_would_overflow() -> None:
    """A log-ratio of 100 (a label leaving a two-stage policy's top-M) stays finite:
    it counts as 80 (e^80 ~ 5.5e34), where float32 exp(100) would be inf."""
    new, old = T([[100.0, 0.0]]), T([[0.0, 0.0]])
    out = L.grpo_loss(new, old, T([[-1.0, 1.0]]), ALL2, clip_epsilon=0.2, kl_beta=0.1)
    r = math.exp(80.0)
    # ppo: -mean(min(r*-1, 1.2*-1), min(1*1, 1*1)) = -(-r + 1) / 2; kl: mean(r - 1 - 80, 0)
    assert out["ppo"].item() == pytest.approx((r - 1) / 2, rel=1e-5)
    assert out["kl"].item() == pytest.approx((r - 81) / 2, rel=1e-5)
    assert math.isfinite(out["loss"].item())

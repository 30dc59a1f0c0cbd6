"""Offline selection metrics (docs/algorithm.md#validation), as pure functions of [B, G] tensors.

Each function returns per-query values plus a mask of the queries for which the
value is defined, so callers can average across batches exactly.
"""

from __future__ import annotations

import math

import torch

#: What the trainer adds to every epoch's metrics, whatever the phase: the loss and the
#: gradient norm and learning rate of the steps (averaged), the epoch's wall time and,
#: when some were, the steps skipped for a non-finite loss or gradient. A phase declares
#: the rest (``Phase.metric_names``).
TRAINER_METRICS = ("train_loss", "train_grad_norm", "train_lr", "epoch_seconds", "skipped_steps")

#: What the trainer adds to every epoch's metrics when the run has a judge: what judging
#: cost in the epoch (its validation included): verdicts asked of the environment
#: (retries included), seconds spent waiting for it, the share of the verdicts wanted
#: that the memory or the store already held, and calls asked again after a transient
#: failure. Like ``epoch_seconds`` they measure the cost, not the result: a resumed run
#: reports its own (a verdict judged before the interruption is a cache hit after it).
JUDGE_COST_METRICS = ("judge_calls", "judge_seconds", "judge_cache_hit_rate", "judge_retries")
#: Metrics that differ between an interrupted-and-resumed run and an uninterrupted one.
COST_METRICS = ("epoch_seconds", *JUDGE_COST_METRICS)

#: The names :func:`selection_metrics` returns.
SELECTION_METRICS = (
    "policy_reward@1",
    "policy_correct@1",
    "random_reward",
    "oracle_reward",
    "normalized_gain",
    "spearman",
)


def average_ranks(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Ranks (0-based, ties share their average rank) of the masked entries per row.

    Padded entries get rank 0 and must be ignored by the caller.
    """
    v = values.masked_fill(~mask, float("inf"))
    # less[i, j, k] = v_k < v_j; equal[i, j, k] = v_k == v_j (both among real entries)
    vj = v.unsqueeze(-1)
    vk = v.unsqueeze(-2)
    m = mask.unsqueeze(-2)
    less = ((vk < vj) & m).sum(-1).to(values.dtype)
    equal = ((vk == vj) & m).sum(-1).to(values.dtype)
    ranks = less + (equal - 1) / 2
    return ranks.masked_fill(~mask, 0.0)


def spearman(
    a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row Spearman correlation of ``a`` and ``b`` over masked entries.

    Returns ``(rho [B], defined [B])``: rows with fewer than two entries or a
    constant ``a`` or ``b`` are undefined.
    """
    m = mask.to(a.dtype)
    n = m.sum(-1)
    ra, rb = average_ranks(a, mask), average_ranks(b, mask)
    ma = (ra * m).sum(-1, keepdim=True) / n.clamp_min(1).unsqueeze(-1)
    mb = (rb * m).sum(-1, keepdim=True) / n.clamp_min(1).unsqueeze(-1)
    da, db = (ra - ma) * m, (rb - mb) * m
    cov = (da * db).sum(-1)
    var = (da * da).sum(-1) * (db * db).sum(-1)
    defined = (n >= 2) & (var > 0)
    rho = torch.where(defined, cov / var.clamp_min(1e-30).sqrt(), torch.zeros_like(cov))
    return rho, defined


def selection_metrics(
    logprobs: torch.Tensor, rewards_raw: torch.Tensor, correct: torch.Tensor, mask: torch.Tensor
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per-query selection metrics: ``{name: (values [B], defined [B])}``.

    The policy's pick is the candidate with the highest sequence log-prob (the
    first one on ties).
    """
    pick = logprobs.masked_fill(~mask, float("-inf")).argmax(-1, keepdim=True)
    policy = rewards_raw.gather(-1, pick).squeeze(-1)
    policy_correct = correct.gather(-1, pick).squeeze(-1)
    m = mask.to(rewards_raw.dtype)
    random = (rewards_raw * m).sum(-1) / m.sum(-1).clamp_min(1)
    oracle = rewards_raw.masked_fill(~mask, float("-inf")).amax(-1)
    has = mask.any(-1)
    gain_defined = has & (oracle > random)
    gain = torch.where(
        gain_defined,
        (policy - random) / (oracle - random).clamp_min(1e-30),
        torch.zeros_like(policy),
    )
    rho, rho_defined = spearman(logprobs, rewards_raw, mask)
    return {
        "policy_reward@1": (policy, has),
        "policy_correct@1": (policy_correct, has),
        "random_reward": (random, has),
        "oracle_reward": (oracle, has),
        "normalized_gain": (gain, gain_defined),
        "spearman": (rho, rho_defined),
    }


# -- uncertainty of a mean over queries ------------------------------------------------

#: Two-sided 95 % quantile of the standard normal distribution.
Z95 = 1.959963984540054
#: Suffixes of the interval bounds stored next to a metric (``policy_reward@1_ci_low``).
CI_LOW, CI_HIGH = "_ci_low", "_ci_high"


def wilson_interval(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion ``successes / n`` (NaNs for ``n == 0``).

    Unlike the normal interval it stays inside [0, 1] and does not collapse to a point
    at 0 or 1 (9 of 10 correct: [0.596, 0.982]).
    """
    if n <= 0:
        return math.nan, math.nan
    p = successes / n
    zz = z * z
    denominator = 1.0 + zz / n
    center = (p + zz / (2 * n)) / denominator
    half = z / denominator * math.sqrt(p * (1.0 - p) / n + zz / (4 * n * n))
    return max(0.0, center - half), min(1.0, center + half)


def mean_interval(values: torch.Tensor, z: float = Z95) -> tuple[float, float, float]:
    """``(mean, low, high)``: the mean of the finite ``values`` and its 95 % interval.

    Values that are all 0 or 1 (a correctness rate) get the :func:`wilson_interval`;
    others the normal interval ``mean +- z * sd / sqrt(n)`` (sample standard deviation,
    n - 1 degrees of freedom), which needs at least two values (else the bounds are NaN).
    """
    v = values.detach().to(torch.float64).flatten()
    v = v[torch.isfinite(v)]
    n = len(v)
    if n == 0:
        return math.nan, math.nan, math.nan
    mean = float(v.mean())
    if bool(((v == 0) | (v == 1)).all()):
        low, high = wilson_interval(float(v.sum()), n, z)
        return mean, low, high
    if n < 2:
        return mean, math.nan, math.nan
    half = z * float(v.std(unbiased=True)) / math.sqrt(n)
    return mean, mean - half, mean + half


def paired_difference(
    new: torch.Tensor, old: torch.Tensor, z: float = Z95
) -> tuple[float, float, int]:
    """``(mean, half_width, n)`` of the per-query differences ``new - old``.

    Only queries where both values are finite count. ``half_width`` is ``z`` times the
    standard error of the mean difference (sample standard deviation of the differences
    over sqrt(n)): pairing removes what the two policies share (how hard each query
    is), so it is much narrower than the two separate intervals. NaN for n < 2.
    """
    a = new.detach().to(torch.float64).flatten()
    b = old.detach().to(torch.float64).flatten()
    if a.shape != b.shape:
        raise ValueError(f"paired values of different lengths: {len(a)} and {len(b)}")
    both = torch.isfinite(a) & torch.isfinite(b)
    d = (a - b)[both]
    n = len(d)
    if n == 0:
        return math.nan, math.nan, 0
    mean = float(d.mean())
    if n < 2:
        return mean, math.nan, n
    return mean, z * float(d.std(unbiased=True)) / math.sqrt(n), n


def clearly_better(
    new: torch.Tensor, old: torch.Tensor, larger_is_better: bool = True, z: float = Z95
) -> tuple[bool, float, float, int]:
    """Whether ``new`` beats ``old`` beyond the noise: the 95 % interval of the paired
    mean difference lies entirely on the better side of 0.

    Returns ``(better, difference, half_width, n)`` with ``difference`` signed so that
    positive is better. Fewer than two paired queries never count as better.
    """
    mean, half, n = paired_difference(new, old, z)
    if not larger_is_better:
        mean = -mean
    better = n >= 2 and math.isfinite(half) and mean - half > 0
    return better, mean, half, n

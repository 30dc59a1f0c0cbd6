"""Offline selection metrics (docs/algorithm.md#validation), as pure functions of [B, G] tensors.

Each function returns per-query values plus a mask of the queries for which the
value is defined, so callers can average across batches exactly.
"""

from __future__ import annotations

import torch

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

"""GRPO advantage estimators (the ``compute_advantages`` hook) beside the default ``group-zscore``.

Over each query's kept candidates with rewards ``r`` (the phase's reward), ``n`` of them:

* ``group-center`` (Dr. GRPO, Liu et al. 2025): ``A = r - mean(r)``, no division by the
  group's std, so groups with a small spread are not blown up;
* ``rloo`` (leave-one-out, Ahmadian et al. 2024): ``A_j = r_j - mean of the others =
  n / (n - 1) * (r_j - mean(r))``;
* ``rank-advantage`` (upstream ``--use_rank_advantage``): ``A = 1 - 2 * rank / (n - 1)``,
  rank 0 the highest reward; tied rewards share their average rank, so an all-equal
  group gets 0 (the ``rank`` normaliser breaks ties by index instead).

A group of one candidate gets 0 from each; padded entries are 0.
"""

from __future__ import annotations

import torch

from lever_trainer.api import About, hookimpl, masked_mean, metrics


class GroupCenter:
    """``r - mean(r)``."""

    @hookimpl
    def about(self) -> About:
        """What ``lever-train plugins`` shows of this plugin."""
        return About(
            description="GRPO advantages r - mean(r) per group, no std division (Dr. GRPO)",
        )

    @hookimpl
    def compute_advantages(self, rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The centred rewards."""
        centred = rewards - masked_mean(rewards, mask).unsqueeze(-1)
        return centred.masked_fill(~mask, 0.0)


class RLOO:
    """Leave-one-out baseline."""

    @hookimpl
    def about(self) -> About:
        """What ``lever-train plugins`` shows of this plugin."""
        return About(
            description="GRPO advantages r_j - mean of the group's other rewards (RLOO)",
        )

    @hookimpl
    def compute_advantages(self, rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``n / (n - 1) * (r - mean)``; 0 for groups of one."""
        n = mask.sum(-1, keepdim=True).to(rewards.dtype)
        centred = rewards - masked_mean(rewards, mask).unsqueeze(-1)
        scale = torch.where(n > 1, n / (n - 1).clamp_min(1.0), torch.zeros_like(n))
        return (centred * scale).masked_fill(~mask, 0.0)


class RankAdvantage:
    """``1 - 2 * rank / (n - 1)``."""

    @hookimpl
    def about(self) -> About:
        """What ``lever-train plugins`` shows of this plugin."""
        return About(
            description="GRPO advantages 1 - 2 rank/(n-1) per group (upstream rank advantage)",
            enable_flags=("--use_rank_advantage",),
        )

    @hookimpl
    def compute_advantages(self, rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Rank from the top (average rank on ties), mapped to [-1, 1]."""
        n = mask.sum(-1, keepdim=True).to(rewards.dtype)
        rank = metrics.average_ranks(-rewards, mask)  # 0 = highest reward
        adv = 1.0 - 2.0 * rank / (n - 1).clamp_min(1.0)
        return torch.where(n > 1, adv, torch.zeros_like(adv)).masked_fill(~mask, 0.0)


group_center = GroupCenter()
rloo = RLOO()
rank_advantage = RankAdvantage()

"""Rank reward: a phase weighs each candidate by its rank, not its raw reward.

A third-party lever_trainer plugin (distribution ``lever-trainer-rank-reward``).
Within a query's real candidates (``batch.cand_mask``), the candidate with the
highest raw reward (``batch.rewards_raw``) scores 1, the lowest -1, the rest are
spaced evenly between: ``1 - 2 * rank / (n - 1)``, rank 0 being the best and ties
going to the lower index. A query with one candidate scores 0. Off by default:
``lever-train --plugin rank-reward``.

It also adds a raw-reward formula through the ``reward_modes`` hook, without any
edit to lever_trainer: ``--reward-mode acc_squared`` scores a candidate
``ws * vqa_acc_score ** 2`` (a missing score counts as 0).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from lever_trainer.api import Batch, RawRewardFn, RewardChoice, RewardParams, TrainState, hookimpl

DESCRIPTION = (
    "RCE and GRPO weigh candidates by the rank of their raw reward (1 best, -1 worst); "
    "reward mode acc_squared"
)

#: The phases this plugin answers ``select_reward`` for.
PHASES = ("rce", "grpo")


def rank_scores(rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per query, ``1 - 2 * rank / (n - 1)`` over the real candidates ([B, G] -> [B, G]).

    ``rank`` counts the real candidates of the query that come before a candidate:
    a higher reward, or an equal reward at a lower index. ``n`` is the number of
    real candidates; with ``n = 1`` the score is 0. Padded entries (``mask``
    False) neither count nor score: they get 0, whatever they hold.
    """
    mask = mask.to(torch.bool)
    dtype = rewards.dtype if rewards.is_floating_point() else torch.float32
    r = rewards.to(dtype)
    index = torch.arange(r.shape[-1], device=r.device)
    # ahead[b, i, j]: candidate j of query b is ranked before candidate i.
    r_i, r_j = r.unsqueeze(-1), r.unsqueeze(-2)
    ahead = (r_j > r_i) | ((r_j == r_i) & (index.unsqueeze(0) < index.unsqueeze(1)))
    rank = (ahead & mask.unsqueeze(-2)).sum(-1).to(dtype)
    n = mask.sum(-1, keepdim=True).to(dtype)
    scores = 1.0 - 2.0 * rank / (n - 1.0).clamp_min(1.0)
    return torch.where(mask & (n > 1), scores, torch.zeros_like(scores))


def rank_reward(batch: Batch) -> torch.Tensor:
    """``RewardChoice.compute``: rank scores of ``batch.rewards_raw`` under ``batch.cand_mask``."""
    return rank_scores(batch.rewards_raw, batch.cand_mask)


@hookimpl
def select_reward(state: TrainState, phase: str) -> RewardChoice | None:
    """Answer for the RCE and GRPO phases."""
    if phase not in PHASES:
        return None
    return RewardChoice(name="rank", source="rank of beam_rewards_raw", compute=rank_reward)


def acc_squared(cand: Mapping[str, Any], params: RewardParams) -> float:
    """``ws * s ** 2`` with ``s = vqa_acc_score`` (0 when missing), ``ws = --soft-weight``."""
    acc = cand.get("vqa_acc_score")
    return params.soft * float(acc or 0.0) ** 2


#: The raw-reward modes this plugin adds (``--reward-mode NAME``).
MODES: dict[str, RawRewardFn] = {"acc_squared": acc_squared}


@hookimpl
def reward_modes() -> Mapping[str, RawRewardFn]:
    """Add ``acc_squared``."""
    return MODES

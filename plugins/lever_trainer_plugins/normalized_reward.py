"""RCE weighs the group-normalised rewards (``beam_rewards``) instead of raw ones."""

from __future__ import annotations

from lever_trainer.api import RewardChoice, TrainState, hookimpl

DESCRIPTION = "RCE weighs group-normalised rewards (beam_rewards)"


@hookimpl
def select_reward(state: TrainState, phase: str) -> RewardChoice | None:
    """Answer for the RCE phase only."""
    if phase != "rce":
        return None
    return RewardChoice.from_batch_field("normalized", "beam_rewards", "rewards_norm")

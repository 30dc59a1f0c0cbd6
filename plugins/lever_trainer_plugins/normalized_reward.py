"""RCE weighs the group-normalised rewards (``beam_rewards``) instead of raw ones."""

from __future__ import annotations

from lever_trainer.api import About, RewardChoice, TrainState, hookimpl


@hookimpl
def about() -> About:
    """``--rce_use_normalized_reward`` (the seed script's flag) asks for it."""
    return About(
        description="RCE weighs group-normalised rewards (beam_rewards)",
        enable_flags=("--rce_use_normalized_reward",),
        chooses="the RCE reward",
    )


@hookimpl
def select_reward(state: TrainState, phase: str) -> RewardChoice | None:
    """Answer for the RCE phase only."""
    if phase != "rce":
        return None
    return RewardChoice.from_batch_field("normalized", "beam_rewards", "rewards_norm")

"""RCE weighs each candidate's raw reward (``beam_rewards_raw``). On by default."""

from __future__ import annotations

from lever_trainer.api import About, RewardChoice, TrainState, hookimpl


@hookimpl
def about() -> About:
    """On by default; ``--rce_use_raw_reward`` (the seed script's flag) asks for it."""
    return About(
        description="RCE weighs raw rewards (beam_rewards_raw)",
        enabled_by_default=True,
        enable_flags=("--rce_use_raw_reward",),
        chooses="the RCE reward",
    )


@hookimpl
def select_reward(state: TrainState, phase: str) -> RewardChoice | None:
    """Answer for the RCE phase only."""
    if phase != "rce":
        return None
    return RewardChoice.from_batch_field("raw", "beam_rewards_raw", "rewards_raw")

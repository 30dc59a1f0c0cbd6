"""RCE weighs each candidate's raw reward (``beam_rewards_raw``). On by default."""

from __future__ import annotations

from lever_trainer.api import RewardChoice, TrainState, hookimpl

ENABLED_BY_DEFAULT = True
DESCRIPTION = "RCE weighs raw rewards (beam_rewards_raw)"


@hookimpl
def select_reward(state: TrainState, phase: str) -> RewardChoice | None:
    """Answer for the RCE phase only."""
    if phase != "rce":
        return None
    return RewardChoice.from_batch_field("raw", "beam_rewards_raw", "rewards_raw")

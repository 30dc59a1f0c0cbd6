"""GRPO scores its groups with the group-normalised rewards (``beam_rewards``).

On by default; a plugin answering ``select_reward`` for ``"grpo"`` and named with
``--plugin`` replaces it.
"""

from __future__ import annotations

from lever_trainer.api import About, RewardChoice, TrainState, hookimpl


@hookimpl
def about() -> About:
    """What ``lever-train plugins`` shows of this plugin."""
    return About(
        description="GRPO advantages come from group-normalised rewards (beam_rewards)",
        enabled_by_default=True,
    )


@hookimpl
def select_reward(state: TrainState, phase: str) -> RewardChoice | None:
    """Answer for the GRPO phase only."""
    if phase != "grpo":
        return None
    return RewardChoice.from_batch_field("normalized", "beam_rewards", "rewards_norm")

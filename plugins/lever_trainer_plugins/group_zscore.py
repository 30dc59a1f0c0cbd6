"""GRPO advantages: the group's z-score with a floor on the std. On by default.

``A = clamp((r - mean(r)) / max(std(r), 0.1), -c, c)`` over each query's kept
candidates (unbiased std; a group of one has ``A = 0``), ``c = --advantage-clip``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lever_trainer.api import About, Option, TrainState, group_advantages, hookimpl


@hookimpl
def about() -> About:
    """What ``lever-train plugins`` shows of this plugin."""
    return About(
        description="advantages = clamp((r - mean) / max(std, 0.1), -5, 5) per group",
        enabled_by_default=True,
    )


@hookimpl
def compute_advantages(
    state: TrainState, phase: str, rewards: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """The clipped group z-score."""
    return group_advantages(rewards, mask, float(ADVANTAGE_CLIP.of(state.options)))


ADVANTAGE_CLIP = Option(
    ("--advantage-clip", "--advantage_clip"),
    "float",
    5.0,
    "Advantages are clipped to [-c, c].",
    min=0,
    min_open=True,
)


@hookimpl
def add_options() -> Sequence[Option]:
    """The advantage clip."""
    return [ADVANTAGE_CLIP]

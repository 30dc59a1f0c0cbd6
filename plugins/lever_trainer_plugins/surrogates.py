"""The surrogate objective a GRPO step maximises (the ``policy_objective`` hook).

With ``r`` the ratio ``exp(new - ref)`` and ``A`` the advantage of a kept candidate:

* ``ppo-clip`` (on by default): the reference's ``min(r A, clamp(r, 1 - eps, 1 + eps) A)``
  with ``eps = --clip-epsilon``;
* ``clip-higher`` (DAPO): the same with a separate upper bound, ``clamp(r, 1 - eps,
  1 + eps_high)`` (``--clip-epsilon-high``, default 0.28), so that unlikely sequences
  with a positive advantage can gain more before the clip stops them;
* ``dual-clip`` (Ye et al., 2020): PPO's clip plus a floor ``c A`` for negative
  advantages (``--dual-clip-c``, default 3): ``max(min(r A, clamp(r) A), c A)`` when
  ``A < 0``, so a very large ratio on a bad sequence cannot produce an unbounded loss.

``clipped_low`` marks candidates whose gradient the lower bound removed (``r < 1 - eps``,
``A < 0``); ``clipped_high`` those the upper bound removed (``r > 1 + eps`` with
``A > 0``, and for ``dual-clip`` also ``r > c`` with ``A < 0``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lever_trainer.api import About, Option, PolicyObjective, TrainState, hookimpl

from ._group_objective import CLIP_EPSILON


def clipped_objective(
    ratio: torch.Tensor, advantages: torch.Tensor, low: float, high: float
) -> PolicyObjective:
    """``min(r A, clamp(r, 1 - low, 1 + high) A)`` with the masks of the two clips."""
    clipped = ratio.clamp(1.0 - low, 1.0 + high) * advantages
    return PolicyObjective(
        objective=torch.minimum(ratio * advantages, clipped),
        clipped_low=(ratio < 1.0 - low) & (advantages < 0),
        clipped_high=(ratio > 1.0 + high) & (advantages > 0),
    )


CLIP_EPSILON_HIGH = Option(
    ("--clip-epsilon-high",),
    "float",
    0.28,
    "clip-higher: ratios above 1 + eps_high stop gaining (the lower bound stays "
    "1 - --clip-epsilon).",
    min=0,
    min_open=True,
)
DUAL_CLIP_C = Option(
    ("--dual-clip-c",),
    "float",
    3.0,
    "dual-clip: the objective of a negative advantage is at least c * A (c > 1).",
    min=1,
    min_open=True,
)


class PPOClip:
    """The clipped surrogate of docs/algorithm.md#grpo-loss."""

    @hookimpl
    def about(self) -> About:
        """What ``lever-train plugins`` shows of this plugin."""
        return About(
            description="GRPO surrogate min(r A, clamp(r, 1 - eps, 1 + eps) A)",
            enabled_by_default=True,
        )

    @hookimpl
    def policy_objective(
        self, state: TrainState, ratio: torch.Tensor, advantages: torch.Tensor
    ) -> PolicyObjective:
        """The symmetric clip at ``--clip-epsilon``."""
        eps = float(CLIP_EPSILON.of(state.options))
        return clipped_objective(ratio, advantages, eps, eps)


class ClipHigher:
    """DAPO's decoupled clip: ``--clip-epsilon`` below, ``--clip-epsilon-high`` above."""

    @hookimpl
    def about(self) -> About:
        """What ``lever-train plugins`` shows of this plugin."""
        return About(
            description="GRPO surrogate with a separate upper clip 1 + eps_high (DAPO clip-higher)",
        )

    @hookimpl
    def policy_objective(
        self, state: TrainState, ratio: torch.Tensor, advantages: torch.Tensor
    ) -> PolicyObjective:
        """``clamp(r, 1 - eps, 1 + eps_high)``."""
        low = float(CLIP_EPSILON.of(state.options))
        high = float(CLIP_EPSILON_HIGH.of(state.options))
        return clipped_objective(ratio, advantages, low, high)

    @hookimpl
    def add_options(self) -> Sequence[Option]:
        """The upper clip."""
        return [CLIP_EPSILON_HIGH]


class DualClip:
    """PPO's clip plus a floor ``c A`` on the objective of negative advantages."""

    @hookimpl
    def about(self) -> About:
        """What ``lever-train plugins`` shows of this plugin."""
        return About(
            description=(
                "GRPO surrogate with a second clip: objective >= c A when A < 0 (dual-clip)"
            ),
        )

    @hookimpl
    def policy_objective(
        self, state: TrainState, ratio: torch.Tensor, advantages: torch.Tensor
    ) -> PolicyObjective:
        """``max(min(r A, clamp(r) A), c A)`` for ``A < 0``."""
        eps = float(CLIP_EPSILON.of(state.options))
        c = float(DUAL_CLIP_C.of(state.options))
        base = clipped_objective(ratio, advantages, eps, eps)
        negative = advantages < 0
        floor = c * advantages
        objective = torch.where(negative, torch.maximum(base.objective, floor), base.objective)
        assert base.clipped_high is not None
        return PolicyObjective(
            objective=objective,
            clipped_low=base.clipped_low,
            clipped_high=base.clipped_high | (negative & (ratio > c)),
        )

    @hookimpl
    def add_options(self) -> Sequence[Option]:
        """The dual-clip constant."""
        return [DUAL_CLIP_C]


ppo_clip = PPOClip()
clip_higher = ClipHigher()
dual_clip = DualClip()

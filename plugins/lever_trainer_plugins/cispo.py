"""CISPO: clipped, detached importance-sampling weights on a REINFORCE-style objective.

Clipped IS-weight Policy Optimization (MiniMax-M1, 2025) keeps every sample's gradient,
where PPO's clip drops the gradient of a sample whose ratio left the trust region: it
clips the importance weight instead and stops its gradient::

    w = sg(clamp(r, 1 - eps_low, 1 + eps_high))
    objective = w * A * log pi(y)        gradient: w * A * grad log pi(y)

The ``policy_objective`` hook receives the ratio ``r = pi(y) / ref(y)``, not
``log pi(y)``; since ``grad r = r * grad log pi(y)``, this plugin writes the objective
as ``sg(w / r) * r * A``: the same gradient, ``w A grad log pi(y)``, with the value
``w A`` (the reported ``ppo`` term is minus its mean). The paper sets no lower bound
(``--cispo-epsilon-low`` 1: the weight is only kept at or above 0) and tunes the upper
one (``--cispo-epsilon-high``, default 0.28). ``clip_low`` / ``clip_high`` report the
shares whose *weight* was capped (their gradient is kept, only scaled). Answers
``policy_objective`` for every phase that learns from groups (``grpo``, ``online``);
another surrogate plugin at the same time is refused at start-up.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lever_trainer.api import About, Option, PolicyObjective, TrainState, hookimpl


def cispo_objective(
    ratio: torch.Tensor, advantages: torch.Tensor, low: float, high: float
) -> PolicyObjective:
    """``sg(w / r) * r * A`` with ``w = clamp(r, 1 - low, 1 + high)``."""
    weight = ratio.detach().clamp(1.0 - low, 1.0 + high)
    scale = weight / ratio.detach().clamp_min(torch.finfo(ratio.dtype).tiny)
    return PolicyObjective(
        objective=scale * ratio * advantages,
        clipped_low=ratio.detach() < 1.0 - low,
        clipped_high=ratio.detach() > 1.0 + high,
    )


@hookimpl
def policy_objective(
    state: TrainState, ratio: torch.Tensor, advantages: torch.Tensor
) -> PolicyObjective:
    """The CISPO objective at the run's bounds."""
    low = float(CISPO_EPSILON_LOW.of(state.options))
    high = float(CISPO_EPSILON_HIGH.of(state.options))
    return cispo_objective(ratio, advantages, low, high)


CISPO_EPSILON_LOW = Option(
    ("--cispo-epsilon-low",),
    "float",
    1.0,
    "cispo: importance weights are kept >= 1 - eps (1: no lower bound).",
    min=0,
    max=1,
)
CISPO_EPSILON_HIGH = Option(
    ("--cispo-epsilon-high",),
    "float",
    0.28,
    "cispo: importance weights are capped at 1 + eps.",
    min=0,
)


@hookimpl
def add_options() -> Sequence[Option]:
    """The bounds of the importance weight."""
    return [
        CISPO_EPSILON_LOW,
        CISPO_EPSILON_HIGH,
    ]


@hookimpl
def about() -> About:
    """What ``lever-train plugins`` shows."""
    return About(
        description="GRPO surrogate sg(clamp(r, 1-eps_low, 1+eps_high)) A log pi (CISPO)",
    )

"""GSPO: a sequence-level, length-normalised importance ratio with sequence-level clipping.

Group Sequence Policy Optimization (Zheng et al., Qwen, 2025) replaces the per-token
ratios of GRPO with one ratio per sequence, the geometric mean of its per-step ratios,
and clips that. For a sequence ``y`` of ``|y|`` steps with log-ratio
``log r = sum_t (log pi(y_t | ...) - log ref(y_t | ...))`` (what the ``policy_objective``
hook receives as ``ratio = exp(log r)``)::

    s = exp(log r / |y|) = r ** (1 / |y|)
    objective = min(s A, clamp(s, 1 - eps_low, 1 + eps_high) A)

so a long sequence does not get an exponentially larger ratio than a short one, and the
clip acts on whole sequences (the paper's ranges are small: ``3e-4`` below, ``4e-4``
above; ``--gspo-epsilon-low``, ``--gspo-epsilon-high``). ``|y|`` is the run's number of
selection steps. Answers ``policy_objective`` for every phase that learns from groups
(``grpo``, ``online``); another surrogate plugin at the same time is refused at start-up.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lever_trainer.api import About, Option, PolicyObjective, TrainState, hookimpl


def gspo_objective(
    ratio: torch.Tensor, advantages: torch.Tensor, steps: int, low: float, high: float
) -> PolicyObjective:
    """``min(s A, clamp(s, 1 - low, 1 + high) A)`` with ``s = ratio ** (1 / steps)``."""
    s = torch.exp(torch.log(ratio) / steps)
    clipped = s.clamp(1.0 - low, 1.0 + high) * advantages
    return PolicyObjective(
        objective=torch.minimum(s * advantages, clipped),
        clipped_low=(s < 1.0 - low) & (advantages < 0),
        clipped_high=(s > 1.0 + high) & (advantages > 0),
    )


@hookimpl
def policy_objective(
    state: TrainState, ratio: torch.Tensor, advantages: torch.Tensor
) -> PolicyObjective:
    """The GSPO surrogate with the run's sequence length."""
    return gspo_objective(
        ratio,
        advantages,
        max(int(state.train.seq_len), 1),
        float(GSPO_EPSILON_LOW.of(state.options)),
        float(GSPO_EPSILON_HIGH.of(state.options)),
    )


GSPO_EPSILON_LOW = Option(
    ("--gspo-epsilon-low",),
    "float",
    3e-4,
    "gspo: sequence ratios below 1 - eps stop losing.",
    min=0,
    max=1,
    min_open=True,
)
GSPO_EPSILON_HIGH = Option(
    ("--gspo-epsilon-high",),
    "float",
    4e-4,
    "gspo: sequence ratios above 1 + eps stop gaining.",
    min=0,
    min_open=True,
)


@hookimpl
def add_options() -> Sequence[Option]:
    """The two sides of the sequence-level clip."""
    return [
        GSPO_EPSILON_LOW,
        GSPO_EPSILON_HIGH,
    ]


@hookimpl
def about() -> About:
    """What ``lever-train plugins`` shows."""
    return About(
        description="GRPO surrogate on the sequence ratio r^(1/|y|), clipped per sequence (GSPO)",
    )

"""SAPO: a soft, temperature-controlled sigmoid gate on the ratio in place of a hard clip.

Soft Adaptive Policy Optimization (Qwen, 2025) replaces PPO's clip, which drops the
gradient of a sample the moment its ratio leaves ``[1 - eps, 1 + eps]``, by a smooth
gate of the ratio ``r``::

    f(r) = sigmoid(tau * (r - 1)) * 4 / tau
    objective = f(r) * A,      tau = tau_pos when A > 0, tau_neg when A < 0

Its slope ``df/dr = 4 s (1 - s)`` with ``s = sigmoid(tau (r - 1))`` is exactly 1 at
``r = 1`` (on-policy, the gradient of the plain ``r A``) and decays smoothly as the
ratio moves away, faster for a larger ``tau``. The paper takes ``tau_neg > tau_pos``
(negative advantages push probability onto many unsampled items, which is less stable):
``--sapo-tau-pos`` 1.0, ``--sapo-tau-neg`` 1.05. There is no hard clip, so
``clip_low`` / ``clip_high`` are not reported. The paper gates per token; this trainer's
ratio is one per sequence, which is what is gated. Answers ``policy_objective`` for
every phase that learns from groups (``grpo``, ``online``); another surrogate plugin at
the same time is refused at start-up.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lever_trainer.api import About, Option, PolicyObjective, TrainState, hookimpl


def sapo_objective(
    ratio: torch.Tensor, advantages: torch.Tensor, tau_pos: float, tau_neg: float
) -> PolicyObjective:
    """``sigmoid(tau (r - 1)) * 4 / tau * A`` with ``tau`` chosen by the sign of ``A``."""
    tau = torch.where(
        advantages > 0,
        torch.full_like(ratio, tau_pos),
        torch.full_like(ratio, tau_neg),
    )
    gate = torch.sigmoid(tau * (ratio - 1.0)) * 4.0 / tau
    return PolicyObjective(objective=gate * advantages)


@hookimpl
def policy_objective(
    state: TrainState, ratio: torch.Tensor, advantages: torch.Tensor
) -> PolicyObjective:
    """The SAPO gate at the run's temperatures."""
    tau_pos = float(SAPO_TAU_POS.of(state.options))
    tau_neg = float(SAPO_TAU_NEG.of(state.options))
    return sapo_objective(ratio, advantages, tau_pos, tau_neg)


SAPO_TAU_POS = Option(
    ("--sapo-tau-pos",),
    "float",
    1.0,
    "sapo: gate temperature for positive advantages (larger: faster decay).",
    min=0,
    min_open=True,
)
SAPO_TAU_NEG = Option(
    ("--sapo-tau-neg",),
    "float",
    1.05,
    "sapo: gate temperature for negative advantages.",
    min=0,
    min_open=True,
)


@hookimpl
def add_options() -> Sequence[Option]:
    """The gate's two temperatures."""
    return [
        SAPO_TAU_POS,
        SAPO_TAU_NEG,
    ]


@hookimpl
def about() -> About:
    """What ``lever-train plugins`` shows."""
    return About(
        description="GRPO surrogate sigmoid(tau (r - 1)) 4/tau A, a soft gate instead of a clip "
        "(SAPO)",
    )

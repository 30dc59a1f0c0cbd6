"""The KL term of GRPO: its estimator, whether the loss carries it, how its weight moves.

KL estimators (the ``kl_estimate`` hook), after Schulman's "Approximating KL
Divergence" (2020), with ``r = exp(new - ref)`` the ratio of a logged sequence: each
estimates ``KL(ref || policy)`` from sequences taken as drawn from the reference.

* ``kl-k3`` (on by default, the reference's): ``r - 1 - log r``; unbiased, never
  negative, low variance;
* ``kl-k1``: ``-log r``; unbiased but high variance, and negative for a single
  sequence the policy likes more than the reference;
* ``kl-k2``: ``(log r)^2 / 2``; biased, never negative, low variance (its gradient is
  the one of the squared log-ratio).

``ppo-clip-only`` (upstream ``--use_ppo_clip_only``) answers ``kl_penalty`` with False:
the loss is the clipped surrogate alone; the KL is still measured and reported.

``kl-target`` (``adapt_kl_beta``) is the proportional controller of Ziegler et al.
(2019): after every step ``beta *= 1 + clamp(kl / target - 1, -0.2, 0.2) / horizon``
(``--kl-target``, ``--kl-horizon`` in optimiser steps; a horizon of 10 is their gain
``K_beta = 0.1``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lever_trainer.api import About, Option, TrainState, hookimpl


class K1:
    """``-log r``."""

    @hookimpl
    def about(self) -> About:
        """What ``lever-train plugins`` shows of this plugin."""
        return About(
            description="GRPO KL estimate k1 = -log r (unbiased, high variance, may be negative)",
        )

    @hookimpl
    def kl_estimate(self, log_ratio: torch.Tensor) -> torch.Tensor:
        """``-log r`` per candidate."""
        return -log_ratio


class K2:
    """``(log r)^2 / 2``."""

    @hookimpl
    def about(self) -> About:
        """What ``lever-train plugins`` shows of this plugin."""
        return About(
            description="GRPO KL estimate k2 = (log r)^2 / 2 (biased, low variance)",
        )

    @hookimpl
    def kl_estimate(self, log_ratio: torch.Tensor) -> torch.Tensor:
        """``(log r)^2 / 2`` per candidate."""
        return 0.5 * log_ratio * log_ratio


class K3:
    """``r - 1 - log r`` (docs/algorithm.md#grpo-loss)."""

    @hookimpl
    def about(self) -> About:
        """What ``lever-train plugins`` shows of this plugin."""
        return About(
            description="GRPO KL estimate k3 = r - 1 - log r (unbiased, low variance)",
            enabled_by_default=True,
        )

    @hookimpl
    def kl_estimate(self, log_ratio: torch.Tensor) -> torch.Tensor:
        """``r - 1 - log r`` per candidate."""
        return torch.exp(log_ratio) - 1.0 - log_ratio


class PPOClipOnly:
    """No KL term in the GRPO loss."""

    @hookimpl
    def about(self) -> About:
        """What ``lever-train plugins`` shows of this plugin."""
        return About(
            description="GRPO loss = clipped surrogate only, no KL term (KL still reported)",
            enable_flags=("--use_ppo_clip_only",),
        )

    @hookimpl
    def kl_penalty(self) -> bool:
        """No KL penalty."""
        return False


KL_TARGET = Option(
    ("--kl-target",),
    "float",
    0.05,
    "kl-target: the KL the controller steers towards.",
    min=0,
    min_open=True,
)
KL_HORIZON = Option(
    ("--kl-horizon",),
    "float",
    10.0,
    "kl-target: optimiser steps over which a 20% KL error moves the weight by "
    "20% (the gain is 1 / horizon).",
    min=1,
)


class KLTarget:
    """Proportional control of the KL weight towards a target KL."""

    @hookimpl
    def about(self) -> About:
        """What ``lever-train plugins`` shows of this plugin."""
        return About(
            description=(
                "KL weight *= 1 + clamp(kl/target - 1, -0.2, 0.2) / horizon (Ziegler et al.)"
            ),
        )

    @hookimpl
    def adapt_kl_beta(self, state: TrainState, kl: float, beta: float) -> float:
        """One step of the proportional controller."""
        error = min(max(kl / float(KL_TARGET.of(state.options)) - 1.0, -0.2), 0.2)
        return beta * (1.0 + error / float(KL_HORIZON.of(state.options)))

    @hookimpl
    def add_options(self) -> Sequence[Option]:
        """Target and horizon."""
        return [
            KL_TARGET,
            KL_HORIZON,
        ]


kl_k1 = K1()
kl_k2 = K2()
kl_k3 = K3()
ppo_clip_only = PPOClipOnly()
kl_target = KLTarget()

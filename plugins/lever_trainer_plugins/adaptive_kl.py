"""Adapt the GRPO KL weight after every step (docs/algorithm.md#adaptive-kl). On by default.

``--no-plugin adaptive-kl`` (upstream ``--disable_adaptive_kl``) keeps the weight fixed
at ``--kl-beta``.
"""

from __future__ import annotations

from lever_trainer.api import About, TrainState, hookimpl
from lever_trainer.api import adapt_kl_beta as adapt


@hookimpl
def about() -> About:
    """What ``lever-train plugins`` shows of this plugin."""
    return About(
        description="KL weight x1.5 when kl > 0.1, /1.5 when kl < 0.01, kept in [0.001, 10]",
        enabled_by_default=True,
        disable_flags=("--disable_adaptive_kl",),
    )


@hookimpl
def adapt_kl_beta(state: TrainState, kl: float, beta: float) -> float:
    """The reference rule, from the batch KL of the step just taken."""
    return adapt(beta, kl)

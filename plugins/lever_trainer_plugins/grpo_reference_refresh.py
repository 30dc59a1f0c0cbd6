"""GRPO measures its ratios against the policy as RCE left it, not the starting model.

The reference implementation takes its log-probs from the starting model, before RCE. After an RCE
phase that learns anything the policy has moved far from it: the ratios explode, the
KL weight climbs to its ceiling and the loss is dominated by the KL term (on the demo
data, KL in the thousands). This plugin recomputes the reference when GRPO starts, so
that GRPO is a trust-region update around the RCE result. On by default;
``--no-plugin grpo-reference-refresh`` (or ``--preset upstream``) restores the reference's
reference.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lever_trainer.api import About, TrainState, hookimpl


@hookimpl
def about() -> About:
    """What ``lever-train plugins`` shows of this plugin."""
    return About(
        description="GRPO reference log-probs = the policy as GRPO starts, after RCE "
        "(off: the starting model, as the reference implementation)",
        enabled_by_default=True,
    )


@hookimpl
def reference_logprobs(
    state: TrainState, phase: str, compute: Callable[[], torch.Tensor]
) -> torch.Tensor:
    """The policy's eval-mode log-probs as the phase starts (after RCE, for GRPO)."""
    return compute()

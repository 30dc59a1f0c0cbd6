"""GRPO measures its ratios against the policy as RCE left it, not the starting model.

By default (SPEC 6) the reference log-probs come from the starting model, before RCE;
after a long RCE phase the policy has moved far from it, the ratios explode and the
KL weight climbs to its ceiling. With this plugin the reference is recomputed at the
start of GRPO, so GRPO is a trust-region update around the RCE result.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lever_trainer.api import TrainState, hookimpl

DESCRIPTION = "GRPO reference log-probs = the policy at the end of RCE (default: the start)"


@hookimpl
def reference_logprobs(
    state: TrainState, phase: str, compute: Callable[[], torch.Tensor]
) -> torch.Tensor:
    """The policy's eval-mode log-probs as the phase starts (after RCE, for GRPO)."""
    return compute()

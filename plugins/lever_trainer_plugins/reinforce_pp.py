"""REINFORCE++: advantages normalised over the whole batch, with the KL folded into the reward.

REINFORCE++ (Hu, 2025) drops the critic and the per-group baseline: each token's reward
is minus ``beta`` times its KL to the reference, the last token also gets the sequence's
reward, the return of a token is the sum of the rewards from it on, and the returns are
normalised over the *batch* (all prompts' samples at once). The KL is then in the
advantage rather than a separate loss term. With one ratio per sequence, as here, the
advantage of a sequence is its return from the first step::

    r'_j = r_j - beta * sum_t log(pi(y_t | ...) / ref(y_t | ...)) = r_j - beta * log_ratio_j
    A_j  = (r'_j - mean(r')) / (std(r') + 1e-8)     (over every kept candidate of the batch)

``sum_t`` of the per-step ``k1`` estimate is exactly the sequence log-ratio, measured on
the current policy and detached (a weight, not a path for gradients); ``std`` is the
population standard deviation; ``beta`` is ``--kl-beta`` (fixed: ``adapt_kl_beta`` only
moves a KL weight in the loss). Since the KL is in the reward, this plugin also answers
``kl_penalty`` with False: the loss is the surrogate alone (``ppo-clip`` by default, as
in the paper), the KL is still reported and the reported KL weight is 0. Answers
``compute_advantages`` and ``kl_penalty`` for every phase that learns from groups
(``grpo``, ``online``); another advantage estimator, or ``ppo-clip-only``, at the same
time is refused at start-up.
"""

from __future__ import annotations

import torch

from lever_trainer.api import About, TrainState, hookimpl

from ._group_objective import KL_BETA

#: Added to the batch's standard deviation (a batch of equal rewards gets advantage 0).
STD_EPS = 1e-8


def batch_advantages(
    rewards: torch.Tensor, mask: torch.Tensor, log_ratio: torch.Tensor, beta: float
) -> torch.Tensor:
    """``(r' - mean) / (std + 1e-8)`` over the batch's kept candidates, ``r' = r - beta
    log_ratio``; 0 on padding."""
    shaped = rewards - beta * log_ratio
    m = mask.to(shaped.dtype)
    n = m.sum().clamp_min(1.0)
    mean = (shaped * m).sum() / n
    std = (((shaped - mean) ** 2 * m).sum() / n).sqrt()
    return ((shaped - mean) / (std + STD_EPS)).masked_fill(~mask, 0.0)


@hookimpl
def compute_advantages(
    state: TrainState, rewards: torch.Tensor, mask: torch.Tensor, log_ratio: torch.Tensor
) -> torch.Tensor:
    """Batch-normalised KL-shaped rewards."""
    return batch_advantages(rewards, mask, log_ratio, float(KL_BETA.of(state.options)))


@hookimpl
def kl_penalty() -> bool:
    """No KL term in the loss: it is in the reward."""
    return False


@hookimpl
def about() -> About:
    """What ``lever-train plugins`` shows."""
    return About(
        description="GRPO advantages (r - beta log r) normalised over the batch, no KL term "
        "(REINFORCE++)",
    )

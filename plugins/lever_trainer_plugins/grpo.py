"""Phase ``grpo``: group-relative, PPO-clipped updates against reference
log-probs, with a KL penalty whose weight adapts. On by default (0 epochs unless
``--grpo-epochs``).

The objective is the one every phase that learns from groups shares (also ``online``;
see ``_group_objective``). Every decision of a step is a hook: which candidates to keep
(``select_candidates``: ``grpo-curriculum`` by default), which groups enter the loss
(``filter_groups``: all), their advantages (``compute_advantages``: ``group-zscore``), the surrogate
(``policy_objective``: ``ppo-clip``), the KL estimate (``kl_estimate``: ``kl-k3``),
whether the KL term is added (``kl_penalty``: yes) and, after the step, the new KL weight
(``adapt_kl_beta``: ``adaptive-kl``). With the defaults the loss per query is
``-mean(min(ratio*A, clamp(ratio, 1-eps, 1+eps)*A)) + beta * mean(ratio - 1 - log ratio)``.

Each step also reports why it learns or not (cheap tensor reductions, no gradient):
clip fractions, mean and max ratio, KL and its weight, the share of groups with all-equal
rewards and of groups left out, the advantages' mean and std, and the policy's entropy.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lever_trainer.api import About, Batch, Option, Phase, TrainState, hookimpl

from ._group_objective import (
    CLIP_EPSILON,
    KL_BETA,
    GroupObjectivePhase,
    check_decisions,
    warn_idle_objective_plugins,
)

GRPO_EPOCHS = Option(
    ("--grpo-epochs", "--grpo_epochs"), "int", 0, "Epochs of the GRPO phase.", min=0
)
GRPO_LR = Option(
    ("--grpo-lr", "--grpo_lr"),
    "float",
    1e-5,
    "GRPO learning rate (AdamW).",
    min=0,
    min_open=True,
)


class GRPOPhase(GroupObjectivePhase):
    """GRPO on the logged groups, with a KL weight that ``adapt_kl_beta`` moves."""

    name = "grpo"
    order = 30
    epochs_option = GRPO_EPOCHS.dest
    lr_option = GRPO_LR.dest
    needs_reference = True
    log_metrics = ("train_kl", "kl_beta")

    def loss(self, state: TrainState, batch: Batch) -> dict[str, torch.Tensor]:
        """The group objective on the logged candidates, scored by the phase's reward."""
        return self.group_loss(state, batch, state.rewards[self.name].compute(batch))


@hookimpl
def add_options() -> Sequence[Option]:
    """Epochs, learning rate, PPO clip and the starting KL weight of GRPO."""
    return [
        GRPO_EPOCHS,
        GRPO_LR,
        KL_BETA,
        CLIP_EPSILON,
    ]


@hookimpl
def phases() -> Sequence[Phase]:
    """The GRPO phase."""
    return [GRPOPhase()]


@hookimpl
def on_train_start(state: TrainState) -> None:
    """Conflicting answers to the hooks of a GRPO step stop the run before it trains; a
    plugin that only changes the group objective in a run without such a phase is named."""
    warn_idle_objective_plugins(state)
    for phase in state.phases:
        if isinstance(phase, GRPOPhase):
            check_decisions(state, phase)


@hookimpl
def about() -> About:
    """What ``lever-train plugins`` shows (on by default)."""
    return About(
        description="phase `grpo`: group-relative PPO against reference log-probs",
        enabled_by_default=True,
    )

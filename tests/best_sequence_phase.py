"""A third training phase added by a plugin, with no edit to lever_trainer (test-only).

Phase ``warmup`` runs before RCE (order 10 < 20): plain cross-entropy on each query's
best logged sequence (highest raw reward, first on ties), averaged over the batch's
queries. Its epochs and learning rate are its own options.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lever_trainer.api import About, Batch, Option, Phase, TrainState, hookimpl, policy_logprobs


@hookimpl
def about() -> About:
    """Off by default: ``--plugin warmup`` adds the phase."""
    return About(description="phase `warmup`: cross-entropy on each query's best logged sequence")


class BestSequencePhase(Phase):
    """Cross-entropy of the best logged sequence of each query."""

    name = "warmup"
    order = 10
    epochs_option = "warmup_epochs"
    lr_option = "warmup_lr"
    needs_reward = False
    metric_names = ()  # its loss returns the loss alone: no metric of its own

    def loss(self, state: TrainState, batch: Batch) -> dict[str, torch.Tensor]:
        best = batch.rewards_raw.masked_fill(~batch.cand_mask, float("-inf")).argmax(-1)
        logprobs = policy_logprobs(state.model, batch)
        return {"loss": -logprobs.gather(1, best.unsqueeze(1)).mean()}


@hookimpl
def add_options() -> Sequence[Option]:
    return [
        Option(("--warmup-epochs",), "int", 1, "Epochs of the warm-up phase.", min=0),
        Option(("--warmup-lr",), "float", 1e-3, "Warm-up learning rate.", min=0, min_open=True),
    ]


@hookimpl
def phases() -> Sequence[Phase]:
    return [BestSequencePhase()]

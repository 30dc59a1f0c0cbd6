"""Phase ``rce``: reward-weighted cross-entropy over each query's logged
sequences, with the temperature annealed linearly over the phase's steps. On by default.

For one query the loss is ``sum_j w_j * CE_j`` with ``CE_j`` the teacher-forced
cross-entropy of sequence j; the weights are the ``rce_weights`` answer (``rce-softmax``
by default: ``w = softmax(r / tau)`` over the candidates' rewards, which reward being the
``select_reward`` answer for ``rce``: raw by default). Each step reports its temperature
``tau`` and the effective sample size ``ess`` of its weights (``(sum w)^2 / sum w^2``
per query, averaged): near 1 when one sequence dominates, the group size when uniform.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from lever_trainer.api import (
    About,
    Batch,
    Option,
    Phase,
    TrainState,
    effective_sample_size,
    expect_tensor,
    hookimpl,
    policy_logprobs,
    rce_temperature,
    weighted_sequence_loss,
)


@hookimpl
def about() -> About:
    """What ``lever-train plugins`` shows of this plugin."""
    return About(
        description="phase `rce`: reward-weighted cross-entropy warm-up",
        enabled_by_default=True,
    )


RCE_EPOCHS = Option(("--rce-epochs", "--rce_epochs"), "int", 10, "Epochs of the RCE phase.", min=0)
RCE_LR = Option(
    ("--rce-lr", "--rce_lr"),
    "float",
    1e-3,
    "RCE learning rate (AdamW).",
    min=0,
    min_open=True,
)
RCE_TEMP_START = Option(
    ("--rce-temp-start", "--rce_temp_start"),
    "float",
    0.5,
    "RCE reward temperature at the first step.",
    min=0,
    min_open=True,
)
RCE_TEMP_END = Option(
    ("--rce-temp-end", "--rce_temp_end"),
    "float",
    0.1,
    "RCE reward temperature at the last step (linear in between).",
    min=0,
    min_open=True,
)


class RCEPhase(Phase):
    """Reward-weighted cross-entropy at an annealed temperature."""

    name = "rce"
    order = 20
    epochs_option = RCE_EPOCHS.dest
    lr_option = RCE_LR.dest
    metric_names = ("train_tau", "train_ess")

    def __init__(self) -> None:
        #: The epochs the phase had when it started: the schedule's length. A run resumed
        #: with more epochs (``--resume DIR --rce-epochs 8``) keeps it, so the extra
        #: epochs continue at ``--rce-temp-end`` instead of re-annealing.
        self.planned_epochs: int | None = None

    def start(self, state: TrainState, resumed: bool) -> None:
        """Fix the schedule's length when the phase starts (a resumed phase keeps its own)."""
        if not resumed or self.planned_epochs is None:
            self.planned_epochs = state.epochs

    def temperature(self, state: TrainState) -> float:
        """``tau_i`` of the current step ``i`` over the phase's ``epochs * steps`` steps
        (the epochs it started with); past them, ``tau_end``."""
        epochs = self.planned_epochs if self.planned_epochs is not None else state.epochs
        total = epochs * state.steps_per_epoch
        return rce_temperature(
            state.step, total, RCE_TEMP_START.of(state.options), RCE_TEMP_END.of(state.options)
        )

    def state_dict(self) -> dict[str, Any]:
        """The schedule's length (``rce_planned_epochs``; None before the phase starts)."""
        return {"rce_planned_epochs": self.planned_epochs}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        """Restore the schedule's length (absent in snapshots of older runs)."""
        self.planned_epochs = saved.get("rce_planned_epochs")

    def weights(
        self, state: TrainState, batch: Batch, rewards: torch.Tensor, tau: float
    ) -> torch.Tensor:
        """The ``rce_weights`` answer [B, G] (pads 0); required."""
        decision = state.require(
            "rce_weights",
            "rce-softmax",
            phase=self.name,
            batch=batch,
            rewards=rewards,
            temperature=tau,
        )
        weights = expect_tensor(
            decision.value, decision.plugin, "rce_weights", tuple(rewards.shape)
        )
        return weights.masked_fill(~batch.cand_mask, 0.0)

    def loss(self, state: TrainState, batch: Batch) -> dict[str, torch.Tensor]:
        """``loss``, the step's temperature ``tau`` and the weights' ``ess``."""
        tau = self.temperature(state)
        logprobs = policy_logprobs(state.model, batch)
        rewards = state.rewards[self.name].compute(batch)
        weights = self.weights(state, batch, rewards, tau)
        loss = weighted_sequence_loss(logprobs, weights, batch.cand_mask)
        with torch.no_grad():
            ess = effective_sample_size(weights, batch.cand_mask).mean()
        return {"loss": loss, "tau": torch.tensor(tau), "ess": ess}


@hookimpl
def add_options() -> Sequence[Option]:
    """Epochs, learning rate and the temperature schedule of RCE."""
    return [
        # Defaults: the quality task's best offline recipe (reference: 5 epochs, 1e-4, 2.0 -> 0.5;
        # `--preset upstream`).
        RCE_EPOCHS,
        RCE_LR,
        RCE_TEMP_START,
        RCE_TEMP_END,
    ]


@hookimpl
def phases() -> Sequence[Phase]:
    """The RCE phase."""
    return [RCEPhase()]

"""Phase ``grpo`` (SPEC section 6): group-relative, PPO-clipped updates against reference
log-probs, with a KL penalty whose weight adapts. On by default (0 epochs unless
``--grpo-epochs``).

Each step asks the plugins which candidates to keep (``select_candidates``: the
``grpo-curriculum`` by default), their advantages (``compute_advantages``:
``group-zscore``) and, after the step, the new KL weight (``adapt_kl_beta``:
``adaptive-kl``). The loss per query is
``-mean(min(ratio*A, clamp(ratio, 1-eps, 1+eps)*A)) + beta * mean(ratio - 1 - log ratio)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from lever_trainer.api import (
    Batch,
    LeverError,
    Option,
    Phase,
    PluginError,
    TrainState,
    expect_tensor,
    gather_groups,
    grpo_loss,
    hookimpl,
    policy_logprobs,
)

ENABLED_BY_DEFAULT = True
DESCRIPTION = "phase `grpo` (SPEC 6): group-relative PPO against reference log-probs"


class GRPOPhase(Phase):
    """GRPO with a KL weight that the ``adapt_kl_beta`` hook moves after every step."""

    name = "grpo"
    order = 30
    epochs_option = "grpo_epochs"
    lr_option = "grpo_lr"
    needs_reference = True
    log_metrics = ("train_kl", "kl_beta")
    metric_names = ("train_ppo", "train_kl", "train_mean_ratio", "train_kept", "kl_beta")

    def __init__(self) -> None:
        self.kl_beta = 0.0

    def init(self, state: TrainState) -> None:
        """The KL weight starts at ``--kl-beta``."""
        self.kl_beta = float(state.options["kl_beta"])

    def kept_candidates(
        self, state: TrainState, batch: Batch, rewards: torch.Tensor
    ) -> torch.Tensor:
        """The ``select_candidates`` answer (every candidate when nobody answers)."""
        decision = state.decide("select_candidates", phase=self.name, batch=batch, rewards=rewards)
        if decision is None:
            return batch.cand_mask
        keep = expect_tensor(
            decision.value, decision.plugin, "select_candidates", tuple(rewards.shape), torch.bool
        )
        return keep & batch.cand_mask

    def advantages(
        self, state: TrainState, rewards: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """The ``compute_advantages`` answer; required."""
        decision = state.decide("compute_advantages", phase=self.name, rewards=rewards, mask=mask)
        if decision is None:
            raise LeverError(
                f"no active plugin answers hook compute_advantages for phase {self.name!r}; "
                "enable one (e.g. --plugin group-zscore)"
            )
        return expect_tensor(
            decision.value, decision.plugin, "compute_advantages", tuple(rewards.shape)
        )

    def loss(self, state: TrainState, batch: Batch) -> dict[str, torch.Tensor]:
        """``loss``, ``ppo``, ``kl``, ``mean_ratio`` and ``kept`` (candidates per query)."""
        rewards = state.rewards[self.name].compute(batch)
        keep = self.kept_candidates(state, batch, rewards)
        kept, kept_rewards = gather_groups(batch, keep, rewards)
        advantages = self.advantages(state, kept_rewards, kept.cand_mask)
        assert kept.ref_logprobs is not None
        out = grpo_loss(
            policy_logprobs(state.model, kept),
            kept.ref_logprobs,
            advantages,
            kept.cand_mask,
            state.options["clip_epsilon"],
            self.kl_beta,
        )
        out["kept"] = kept.cand_mask.sum(-1).to(torch.float32).mean()
        return out

    def after_step(self, state: TrainState, values: dict[str, float]) -> None:
        """Let ``adapt_kl_beta`` move the KL weight; no answer keeps it."""
        decision = state.decide("adapt_kl_beta", kl=values["kl"], beta=self.kl_beta)
        if decision is None:
            return
        beta = decision.value
        if (
            isinstance(beta, bool)
            or not isinstance(beta, int | float)
            or not math.isfinite(beta)
            or beta < 0
        ):
            raise PluginError(
                f"plugin {decision.plugin}: hook adapt_kl_beta returned "
                f"{type(beta).__name__} {beta!r:.40}, expected a finite number >= 0"
            )
        self.kl_beta = float(beta)

    def epoch_metrics(self, state: TrainState) -> dict[str, float]:
        """The KL weight at the end of the epoch."""
        return {"kl_beta": self.kl_beta}

    def state_dict(self) -> dict[str, Any]:
        """The KL weight."""
        return {"kl_beta": self.kl_beta}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        """Restore the KL weight."""
        self.kl_beta = float(saved["kl_beta"])


@hookimpl
def add_options() -> Sequence[Option]:
    """Epochs, learning rate, PPO clip and the starting KL weight of GRPO."""
    return [
        Option(("--grpo-epochs", "--grpo_epochs"), "int", 0, "Epochs of the GRPO phase.", min=0),
        Option(
            ("--grpo-lr", "--grpo_lr"),
            "float",
            1e-5,
            "GRPO learning rate (AdamW).",
            min=0,
            min_open=True,
        ),
        Option(
            ("--kl-beta", "--kl_beta"),
            "float",
            0.1,
            "Starting weight of the KL penalty.",
            min=0,
        ),
        Option(
            ("--clip-epsilon", "--clip_epsilon"),
            "float",
            0.2,
            "PPO clip: ratios are clipped to [1 - eps, 1 + eps].",
            min=0,
            min_open=True,
        ),
    ]


@hookimpl
def phases() -> Sequence[Phase]:
    """The GRPO phase."""
    return [GRPOPhase()]

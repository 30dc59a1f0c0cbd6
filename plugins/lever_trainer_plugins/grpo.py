"""Phase ``grpo``: group-relative, PPO-clipped updates against reference
log-probs, with a KL penalty whose weight adapts. On by default (0 epochs unless
``--grpo-epochs``).

Every decision of a step is a hook: which candidates to keep (``select_candidates``:
``grpo-curriculum`` by default), which groups enter the loss (``filter_groups``: all),
their advantages (``compute_advantages``: ``group-zscore``), the surrogate
(``policy_objective``: ``ppo-clip``), the KL estimate (``kl_estimate``: ``kl-k3``),
whether the KL term is added (``kl_penalty``: yes) and, after the step, the new KL weight
(``adapt_kl_beta``: ``adaptive-kl``). With the defaults the loss per query is
``-mean(min(ratio*A, clamp(ratio, 1-eps, 1+eps)*A)) + beta * mean(ratio - 1 - log ratio)``.

Each step also reports why it learns or not (cheap tensor reductions, no gradient):
clip fractions, mean and max ratio, KL and its weight, the share of groups with all-equal
rewards and of groups left out, the advantages' mean and std, and the policy's entropy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from lever_trainer.api import (
    Batch,
    Option,
    Phase,
    PluginError,
    PolicyObjective,
    TrainState,
    bounded_log_ratio,
    equal_reward_groups,
    expect_tensor,
    gather_groups,
    hookimpl,
    masked_mean,
    masked_std,
    sequence_logprobs,
    step_entropy,
)

ENABLED_BY_DEFAULT = True
DESCRIPTION = "phase `grpo`: group-relative PPO against reference log-probs"


class GRPOPhase(Phase):
    """GRPO with a KL weight that the ``adapt_kl_beta`` hook moves after every step."""

    name = "grpo"
    order = 30
    epochs_option = "grpo_epochs"
    lr_option = "grpo_lr"
    needs_reference = True
    log_metrics = ("train_kl", "kl_beta")
    metric_names = (
        "train_ppo",
        "train_kl",
        "train_mean_ratio",
        "train_max_ratio",
        "train_clip_low",
        "train_clip_high",
        "train_kl_beta",
        "train_adv_mean",
        "train_adv_std",
        "train_zero_var_groups",
        "train_skipped_groups",
        "train_entropy",
        "train_kept",
        "kl_beta",
    )

    def __init__(self) -> None:
        self.kl_beta = 0.0
        self.use_kl = True

    def init(self, state: TrainState) -> None:
        """The KL weight starts at ``--kl-beta``."""
        self.kl_beta = float(state.options["kl_beta"])
        self.use_kl = True

    def start(self, state: TrainState, resumed: bool) -> None:
        """Ask ``kl_penalty`` whether the loss carries the KL term (default: yes)."""
        decision = state.decide("kl_penalty", phase=self.name)
        self.use_kl = True if decision is None else bool(decision.value)

    @property
    def applied_kl_beta(self) -> float:
        """The weight the loss gives the KL term (0 without a KL penalty)."""
        return self.kl_beta if self.use_kl else 0.0

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

    def groups_in_loss(
        self, state: TrainState, kept: Batch, rewards: torch.Tensor
    ) -> torch.Tensor | None:
        """The ``filter_groups`` answers combined with *and* ([B] bool), or None (all)."""
        assert state.plugins is not None
        use: torch.Tensor | None = None
        answers = state.plugins.call_all(
            "filter_groups", state=state, phase=self.name, batch=kept, rewards=rewards
        )
        for plugin, answer in answers:
            if answer is None:
                continue
            mask = expect_tensor(answer, plugin, "filter_groups", (len(kept),), torch.bool)
            use = mask if use is None else use & mask
        return use

    def advantages(
        self, state: TrainState, rewards: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """The ``compute_advantages`` answer; required."""
        decision = state.require(
            "compute_advantages", "group-zscore", phase=self.name, rewards=rewards, mask=mask
        )
        return expect_tensor(
            decision.value, decision.plugin, "compute_advantages", tuple(rewards.shape)
        )

    def objective(
        self, state: TrainState, ratio: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor
    ) -> PolicyObjective:
        """The ``policy_objective`` answer; required."""
        decision = state.require(
            "policy_objective",
            "ppo-clip",
            phase=self.name,
            ratio=ratio,
            advantages=advantages,
            mask=mask,
        )
        answer = decision.value
        if not isinstance(answer, PolicyObjective):
            raise PluginError(
                f"plugin {decision.plugin}: hook policy_objective returned "
                f"{type(answer).__name__}, expected a PolicyObjective"
            )
        shape = tuple(ratio.shape)
        expect_tensor(answer.objective, decision.plugin, "policy_objective", shape)
        for clip in (answer.clipped_low, answer.clipped_high):
            if clip is not None:
                expect_tensor(clip, decision.plugin, "policy_objective", shape, torch.bool)
        return answer

    def kl_terms(
        self, state: TrainState, log_ratio: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """The ``kl_estimate`` answer [B, G]; required."""
        decision = state.require(
            "kl_estimate", "kl-k3", phase=self.name, log_ratio=log_ratio, mask=mask
        )
        return expect_tensor(decision.value, decision.plugin, "kl_estimate", tuple(mask.shape))

    def loss(self, state: TrainState, batch: Batch) -> dict[str, torch.Tensor]:
        """``loss``, ``ppo``, ``kl``, ``mean_ratio``, ``kept`` and the step diagnostics."""
        rewards = state.rewards[self.name].compute(batch)
        keep = self.kept_candidates(state, batch, rewards)
        kept, kept_rewards = gather_groups(batch, keep, rewards)
        mask = kept.cand_mask
        use = self.groups_in_loss(state, kept, kept_rewards)
        advantages = self.advantages(state, kept_rewards, mask)
        assert kept.ref_logprobs is not None
        model = state.model
        encoding = model.encode(kept.query_emb, kept.cand_emb, kept.pool_mask)
        logits, _ = model.decode(encoding, kept.pool_mask, kept.sequences)
        new = sequence_logprobs(logits, kept.sequences)
        log_ratio = bounded_log_ratio(new, kept.ref_logprobs, mask)
        ratio = torch.exp(log_ratio)
        surrogate = self.objective(state, ratio, advantages, mask)
        kl_per = self.kl_terms(state, log_ratio, mask)
        ppo_q = -masked_mean(surrogate.objective, mask)  # [B]
        kl_q = masked_mean(kl_per, mask)
        if use is None:
            ppo, kl = ppo_q.mean(), kl_q.mean()
        else:
            # groups left out contribute nothing; the mean runs over those left
            weight = use.to(ppo_q.dtype)
            count = weight.sum().clamp_min(1.0)
            ppo, kl = (ppo_q * weight).sum() / count, (kl_q * weight).sum() / count
        loss = ppo + self.kl_beta * kl if self.use_kl else ppo
        out = {"loss": loss, "ppo": ppo, "kl": kl}
        with torch.no_grad():
            out.update(self.diagnostics(ratio, advantages, mask, surrogate, logits, kept, use))
        return out

    def diagnostics(
        self,
        ratio: torch.Tensor,
        advantages: torch.Tensor,
        mask: torch.Tensor,
        surrogate: PolicyObjective,
        logits: torch.Tensor,
        kept: Batch,
        use: torch.Tensor | None,
    ) -> dict[str, torch.Tensor]:
        """Why the step learns or not: cheap reductions over the kept candidates."""
        m = mask.to(ratio.dtype)
        n = m.sum().clamp_min(1.0)
        zero = torch.zeros((), dtype=ratio.dtype, device=ratio.device)

        def fraction(flags: torch.Tensor | None) -> torch.Tensor:
            return zero if flags is None else (flags & mask).to(ratio.dtype).sum() / n

        flat, flat_mask = advantages.reshape(-1), mask.reshape(-1)
        return {
            "mean_ratio": masked_mean(ratio, mask).mean(),
            "max_ratio": ratio.masked_fill(~mask, 0.0).amax(),
            "clip_low": fraction(surrogate.clipped_low),
            "clip_high": fraction(surrogate.clipped_high),
            "kl_beta": torch.tensor(self.applied_kl_beta),
            "adv_mean": masked_mean(flat, flat_mask),
            "adv_std": masked_std(flat, flat_mask),
            "zero_var_groups": equal_reward_groups(kept.rewards_raw, mask).to(ratio.dtype).mean(),
            "skipped_groups": zero if use is None else (~use).to(ratio.dtype).mean(),
            "entropy": step_entropy(logits, mask),
            "kept": m.sum(-1).mean(),
        }

    def after_step(self, state: TrainState, values: dict[str, float]) -> None:
        """Let ``adapt_kl_beta`` move the KL weight; no answer keeps it (no KL term: no move)."""
        if not self.use_kl:
            return
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
        """The KL weight at the end of the epoch (0 without a KL term)."""
        return {"kl_beta": self.applied_kl_beta}

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

"""The group-relative objective that every phase learning from groups minimises.

Phase ``grpo`` (the logged groups, ratios against reference log-probs) and phase
``online`` (the policy's own judged proposals, ratios against the log-probs they had
when they were proposed) both subclass :class:`GroupObjectivePhase`, so each decision of
a step is the same hook with the same options in both:

1. ``select_candidates``: which candidates of each group the step keeps (default: all;
   ``grpo-curriculum`` answers for ``grpo`` only);
2. ``filter_groups``: which groups enter the loss (broadcast, combined with *and*);
3. the policy's teacher-forced sequence log-probs ``new`` and the log-ratio
   ``log r = new - ref`` (bounded at +-80, 0 on padding);
4. ``compute_advantages``: advantages from the kept rewards (and, for estimators that
   fold a KL into the reward, the detached log-ratio);
5. ``policy_objective``: the per-candidate surrogate (default ``ppo-clip`` at
   ``--clip-epsilon``);
6. ``kl_estimate``: the per-candidate KL (default ``kl-k3``), weighted by the phase's KL
   weight, which starts at ``--kl-beta`` and moves after every step through
   ``adapt_kl_beta``; ``kl_penalty`` (asked when the phase starts) can drop the term.

The loss is ``mean over the groups in the loss of (ppo_q + beta * kl_q)`` with ``ppo_q``
minus the mean surrogate over the group's kept candidates and ``kl_q`` the mean KL.

Before any phase trains, :func:`check_decisions` asks the single-answer hooks of every
such phase that will run once, on a two-candidate example, so that two plugins
answering the same hook (two surrogates, two advantage estimators) stop the run at
start-up with one line rather than after the phases before it have trained.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch

from lever_trainer.api import (
    Batch,
    LeverError,
    Option,
    Phase,
    PluginError,
    PolicyObjective,
    TrainState,
    bounded_log_ratio,
    equal_reward_groups,
    expect_tensor,
    gather_groups,
    masked_mean,
    masked_std,
    sequence_logprobs,
    step_entropy,
)

#: What ``loss`` returns besides ``loss`` (each logged as ``train_<key>``).
STEP_METRICS = (
    "ppo",
    "kl",
    "mean_ratio",
    "max_ratio",
    "clip_low",
    "clip_high",
    "kl_beta",
    "adv_mean",
    "adv_std",
    "zero_var_groups",
    "skipped_groups",
    "entropy",
    "kept",
)


#: The metrics of the group objective (each step's values and the epoch's KL weight).
OBJECTIVE_METRICS: tuple[str, ...] = (
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


#: The GRPO phase declares these two (its ``add_options``); every group-objective phase
#: and the surrogate and advantage plugins read them.
KL_BETA = Option(
    ("--kl-beta", "--kl_beta"),
    "float",
    0.1,
    "Starting weight of the KL penalty.",
    min=0,
)
CLIP_EPSILON = Option(
    ("--clip-epsilon", "--clip_epsilon"),
    "float",
    0.2,
    "PPO clip: ratios are clipped to [1 - eps, 1 + eps].",
    min=0,
    min_open=True,
)


class GroupObjectivePhase(Phase):
    """A phase whose loss is the group-relative objective of the module docstring.

    Subclasses set the :class:`~lever_trainer.api.Phase` attributes and call
    :meth:`group_loss` from ``loss`` with the rewards of the batch's candidates.
    """

    #: What :meth:`group_loss` and :meth:`epoch_metrics` report, the same in every such phase.
    metric_names: ClassVar[tuple[str, ...] | None] = OBJECTIVE_METRICS

    def __init__(self) -> None:
        self.kl_beta = 0.0
        self.use_kl = True

    def init(self, state: TrainState) -> None:
        """The KL weight starts at ``--kl-beta``."""
        self.kl_beta = float(KL_BETA.of(state.options))
        self.use_kl = True

    def start(self, state: TrainState, resumed: bool) -> None:
        """Ask ``kl_penalty`` whether the loss carries the KL term (default: yes)."""
        decision = state.decide("kl_penalty", phase=self.name)
        self.use_kl = True if decision is None else bool(decision.value)

    @property
    def applied_kl_beta(self) -> float:
        """The weight the loss gives the KL term (0 without a KL penalty)."""
        return self.kl_beta if self.use_kl else 0.0

    # -- the hooks of a step ---------------------------------------------------------
    def kept_candidates(
        self, state: TrainState, batch: Batch, rewards: torch.Tensor
    ) -> torch.Tensor | None:
        """The ``select_candidates`` answer, or None when nobody answers (keep all)."""
        decision = state.decide("select_candidates", phase=self.name, batch=batch, rewards=rewards)
        if decision is None:
            return None
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
        self,
        state: TrainState,
        rewards: torch.Tensor,
        mask: torch.Tensor,
        log_ratio: torch.Tensor,
    ) -> torch.Tensor:
        """The ``compute_advantages`` answer; required."""
        decision = state.require(
            "compute_advantages",
            "group-zscore",
            phase=self.name,
            rewards=rewards,
            mask=mask,
            log_ratio=log_ratio,
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

    # -- the loss --------------------------------------------------------------------
    def group_loss(
        self, state: TrainState, batch: Batch, rewards: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """``loss``, ``ppo``, ``kl`` and the step diagnostics of :data:`STEP_METRICS`.

        ``batch.ref_logprobs`` are what the ratios are measured against; ``rewards``
        [B, G] are the rewards the advantages come from.
        """
        keep = self.kept_candidates(state, batch, rewards)
        kept, kept_rewards = batch, rewards
        if keep is not None:
            kept, kept_rewards = gather_groups(batch, keep, rewards)
        mask = kept.cand_mask
        use = self.groups_in_loss(state, kept, kept_rewards)
        assert kept.ref_logprobs is not None
        model = state.model
        encoding = model.encode(kept.query_emb, kept.cand_emb, kept.pool_mask)
        logits, _ = model.decode(encoding, kept.pool_mask, kept.sequences)
        new = sequence_logprobs(logits, kept.sequences)
        log_ratio = bounded_log_ratio(new, kept.ref_logprobs, mask)
        ratio = torch.exp(log_ratio)
        advantages = self.advantages(state, kept_rewards, mask, log_ratio.detach())
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

    # -- after the step --------------------------------------------------------------
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
        """Restore the KL weight (a snapshot without one keeps ``--kl-beta``)."""
        if "kl_beta" in saved:
            self.kl_beta = float(saved["kl_beta"])


def check_decisions(state: TrainState, phase: GroupObjectivePhase) -> None:
    """Ask each single-answer hook of ``phase``'s step once, on a two-candidate example,
    so that conflicting plugins stop the run before anything trains (a run without
    epochs of ``phase`` asks nothing)."""
    if phase.epochs(state) <= 0:
        return
    plugins = state.plugins
    assert plugins is not None
    mask = torch.ones(1, 2, dtype=torch.bool)
    log_ratio = torch.tensor([[0.1, -0.1]])
    rewards = torch.tensor([[1.0, 0.0]])
    asks: list[tuple[str, dict[str, Any]]] = [
        ("compute_advantages", {"rewards": rewards, "mask": mask, "log_ratio": log_ratio}),
        (
            "policy_objective",
            {"ratio": torch.exp(log_ratio), "advantages": rewards - 0.5, "mask": mask},
        ),
        ("kl_estimate", {"log_ratio": log_ratio, "mask": mask}),
        ("kl_penalty", {}),
    ]
    for hook, kwargs in asks:
        plugins.call_single(hook, state=state, phase=phase.name, **kwargs)


#: The hooks of the group objective: a plugin that answers only these (and declares options)
#: changes nothing in a run where no phase learns from groups.
OBJECTIVE_HOOKS = frozenset(
    {
        "compute_advantages",
        "policy_objective",
        "kl_estimate",
        "kl_penalty",
        "adapt_kl_beta",
        "filter_groups",
        "select_candidates",
    }
)


def warn_idle_objective_plugins(state: TrainState) -> None:
    """Say so in the log when a plugin asked for by name only changes the group objective
    and no phase of the run learns from groups: it changes nothing. (A warning, not a
    refusal: ``--preset upstream`` names GRPO's plugins and trains no GRPO by default.)"""
    assert state.plugins is not None
    running = running_phases(state)
    if any(isinstance(p, GroupObjectivePhase) and p.name in running for p in state.phases):
        return
    idle = [
        info.name
        for info in state.plugins.active
        if info.name in state.plugins.explicit
        and (set(info.hooks) - {"add_options"}) <= OBJECTIVE_HOOKS
        and set(info.hooks) & OBJECTIVE_HOOKS
    ]
    if idle:
        state.log(
            f"warning: --plugin {', '.join(sorted(idle))}: only the phases that learn from "
            "groups (grpo, online) use it, and none trains in this run (--grpo-epochs N or "
            "--plugin online would)"
        )


def running_phases(state: TrainState) -> set[str]:
    """Names of the run's phases that have epochs."""
    return {p.name for p in state.phases if p.epochs(state) > 0}


def refuse_unless_applied(state: TrainState, plugin: str, applies_to: set[str], why: str) -> None:
    """Refuse ``plugin``, when the user enabled it, in a run where a phase that learns
    from groups trains and none of ``applies_to`` does: it would change nothing. When
    some of them train beside other such phases, say in the log which ones it changes."""
    assert state.plugins is not None
    if plugin not in state.plugins.explicit:
        return
    running = running_phases(state)
    grouped = {
        p.name for p in state.phases if isinstance(p, GroupObjectivePhase) and p.name in running
    }
    others = sorted(grouped - applies_to)
    if not others:
        return
    if not running & applies_to:
        raise LeverError(
            f"--plugin {plugin}: applies to phase {', '.join(sorted(applies_to))} only "
            f"({why}), which does not train in this run; phase {', '.join(others)} would "
            f"ignore it (drop --plugin {plugin})"
        )
    phases = ", ".join(sorted(applies_to))
    state.log(f"{plugin}: applies to phase {phases}, not {', '.join(others)}")


__all__ = [
    "STEP_METRICS",
    "GroupObjectivePhase",
    "check_decisions",
    "refuse_unless_applied",
    "running_phases",
    "warn_idle_objective_plugins",
]

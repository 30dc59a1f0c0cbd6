"""Pure numerical functions of RCE and GRPO (docs/algorithm.md#rce-loss, #grpo).

Everything here takes tensors and returns tensors. Batched tensors are laid out
[B, G] (queries x candidate sequences) with a boolean ``mask`` marking the real
candidates; padded entries never influence a result. Per-query values are averaged
over the batch, so a batch of one query gives exactly the one-query definition.
"""

from __future__ import annotations

import torch

#: Lower bound of the advantage denominator (docs/algorithm.md#advantages).
ADVANTAGE_STD_FLOOR = 0.1
#: Below this standard deviation a z-score leaves the rewards unchanged (see docs/algorithm.md).
ZSCORE_STD_EPS = 1e-12
#: Bound of a GRPO log-ratio: ``exp`` of anything larger overflows float32 (e^88.7), which
#: would turn a whole step into NaN; inside the bound nothing changes.
LOG_RATIO_BOUND = 80.0


def sequence_logprobs(logits: torch.Tensor, sequences: torch.Tensor) -> torch.Tensor:
    """Sum over steps of log_softmax(logits_t)[y_t].

    ``logits`` [..., S, K] teacher-forced on ``sequences`` [..., S]; returns [...].
    """
    logp = torch.log_softmax(logits, dim=-1)
    return logp.gather(-1, sequences.unsqueeze(-1)).squeeze(-1).sum(-1)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the last dim of the entries where ``mask`` is True ([B, G] -> [B])."""
    m = mask.to(values.dtype)
    return (values * m).sum(-1) / m.sum(-1).clamp_min(1.0)


def masked_std(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Unbiased standard deviation over the last dim of the masked entries ([B, G] -> [B]).

    Groups of fewer than two entries get 0.
    """
    m = mask.to(values.dtype)
    n = m.sum(-1)
    mean = masked_mean(values, mask)
    sq = ((values - mean.unsqueeze(-1)) ** 2 * m).sum(-1)
    return torch.where(n > 1, (sq / (n - 1).clamp_min(1.0)).sqrt(), torch.zeros_like(n))


def rce_temperature(step: int, total_steps: int, tau_start: float, tau_end: float) -> float:
    """Linear annealing of the RCE temperature (docs/algorithm.md#rce-temperature)."""
    if total_steps <= 1:
        return tau_end
    frac = min(1.0, step / (total_steps - 1))
    return tau_start + (tau_end - tau_start) * frac


def rce_loss(
    logprobs: torch.Tensor, rewards: torch.Tensor, mask: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Reward-weighted cross-entropy, averaged over queries.

    ``logprobs`` [B, G] are teacher-forced sequence log-probs (so ``CE_j = -logprob_j``),
    ``rewards`` [B, G] the rewards the phase weighs, ``mask`` [B, G] the real candidates.
    ``w = softmax(r / tau)`` over each query's candidates; ``loss_q = sum_j w_j CE_j``.
    """
    return weighted_sequence_loss(logprobs, softmax_weights(rewards, mask, temperature), mask)


def softmax_weights(rewards: torch.Tensor, mask: torch.Tensor, temperature: float) -> torch.Tensor:
    """RCE weights ``softmax(r / tau)`` over each query's real candidates ([B, G]; pads 0)."""
    scaled = (rewards / temperature).masked_fill(~mask, float("-inf"))
    return torch.softmax(scaled, dim=-1)


def weighted_sequence_loss(
    logprobs: torch.Tensor, weights: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """``mean over queries of -sum_j w_j * logprob_j`` (``CE_j = -logprob_j``); pads ignored."""
    per_query = -(weights * logprobs.masked_fill(~mask, 0.0)).sum(-1)
    return per_query.mean()


def effective_sample_size(weights: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Kish's effective sample size ``(sum w)^2 / sum w^2`` of each query's weights ([B]).

    ``1 / sum w^2`` for weights that sum to one: 1 when one sequence takes all the
    weight, n for uniform weights over n sequences; 0 for a query whose weights are all 0.
    """
    w = weights.masked_fill(~mask, 0.0)
    sq = (w * w).sum(-1)
    return torch.where(sq > 0, w.sum(-1) ** 2 / sq.clamp_min(1e-30), torch.zeros_like(sq))


def step_entropy(logits: torch.Tensor, step_mask: torch.Tensor) -> torch.Tensor:
    """Mean entropy (nats) of the step distributions ``softmax(logits)`` [..., S, K] over
    the entries where ``step_mask`` [...] is True (a scalar; 0 when none is).

    Padded pool entries (``-inf``) carry no probability and no entropy.
    """
    p = torch.softmax(logits, dim=-1)
    per_step: torch.Tensor = torch.special.entr(p).sum(-1).mean(-1)  # [...]
    m = step_mask.to(per_step.dtype)
    return (per_step * m).sum() / m.sum().clamp_min(1.0)


def equal_reward_groups(rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B] True where a query's real candidates all have the same reward (a group of one
    included): such a group has no advantage signal."""
    hi = rewards.masked_fill(~mask, float("-inf")).amax(-1)
    lo = rewards.masked_fill(~mask, float("inf")).amin(-1)
    return (hi - lo).abs() <= 1e-9 * hi.abs().clamp_min(1.0)


def bounded_log_ratio(
    new_logprobs: torch.Tensor, old_logprobs: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """``new - old`` bounded at +-:data:`LOG_RATIO_BOUND`, 0 where ``mask`` is False."""
    log_ratio = (new_logprobs - old_logprobs).clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND)
    return log_ratio.masked_fill(~mask, 0.0)


def group_advantages(rewards: torch.Tensor, mask: torch.Tensor, clip: float = 5.0) -> torch.Tensor:
    """GRPO advantages ``clamp((r - mean) / max(std, 0.1), -clip, clip)`` per query.

    A group of one candidate has advantage 0; padded entries are 0.
    """
    mean = masked_mean(rewards, mask).unsqueeze(-1)
    std = masked_std(rewards, mask).clamp_min(ADVANTAGE_STD_FLOOR).unsqueeze(-1)
    adv = ((rewards - mean) / std).clamp(-clip, clip)
    return adv.masked_fill(~mask, 0.0)


def grpo_terms(
    new_logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_epsilon: float,
) -> dict[str, torch.Tensor]:
    """Per-query PPO and KL terms (docs/algorithm.md#grpo-loss).

    Returns ``ppo`` [B], ``kl`` [B] and ``mean_ratio`` [B], each a mean over the
    query's kept (masked) candidates.
    """
    log_ratio = bounded_log_ratio(new_logprobs, old_logprobs, mask)
    ratio = torch.exp(log_ratio)
    unclipped = ratio * advantages
    clipped = ratio.clamp(1.0 - clip_epsilon, 1.0 + clip_epsilon) * advantages
    ppo = -masked_mean(torch.minimum(unclipped, clipped), mask)
    kl = masked_mean(ratio - 1.0 - log_ratio, mask)
    return {"ppo": ppo, "kl": kl, "mean_ratio": masked_mean(ratio, mask)}


def grpo_loss(
    new_logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_epsilon: float,
    kl_beta: float,
    use_kl: bool = True,
) -> dict[str, torch.Tensor]:
    """Batch GRPO loss: mean over queries of ``ppo + beta * kl`` (or ``ppo`` alone).

    Returns ``loss``, ``ppo``, ``kl`` and ``mean_ratio``, each a scalar averaged
    over the batch's queries.
    """
    terms = grpo_terms(new_logprobs, old_logprobs, advantages, mask, clip_epsilon)
    ppo, kl = terms["ppo"].mean(), terms["kl"].mean()
    loss = ppo + kl_beta * kl if use_kl else ppo
    return {"loss": loss, "ppo": ppo, "kl": kl, "mean_ratio": terms["mean_ratio"].mean()}


def adapt_kl_beta(
    beta: float,
    kl: float,
    high: float = 0.1,
    low: float = 0.01,
    factor: float = 1.5,
    beta_min: float = 0.001,
    beta_max: float = 10.0,
) -> float:
    """Adaptive KL weight after one optimiser step (docs/algorithm.md#adaptive-kl)."""
    if kl > high:
        beta *= factor
    elif kl < low:
        beta /= factor
    return min(max(beta, beta_min), beta_max)


def top_k_mask(rewards: torch.Tensor, mask: torch.Tensor, k: int) -> torch.Tensor:
    """Keep each query's ``k`` highest-reward candidates; ties go to the lower index.

    ``rewards`` [B, G], ``mask`` [B, G] -> new mask [B, G]. Groups with at most
    ``k`` candidates keep them all.
    """
    keyed = rewards.masked_fill(~mask, float("-inf"))
    order = torch.sort(keyed, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order))
    return mask & (rank < k)

"""How RCE weighs each query's logged sequences (the ``rce_weights`` hook).

* ``rce-softmax`` (on by default): the reference's ``w = softmax(r / tau)`` over the
  query's candidates.
* ``top1-only`` (upstream ``--use_top1_only``): plain cross-entropy on the query's first
  logged sequence, averaged over its S steps, whatever the rewards: weight ``1/S`` on
  the first candidate, 0 elsewhere. "First" is the first candidate of the query's
  ``pointer_candidates`` that the loader kept (upstream: beam rank 0).
"""

from __future__ import annotations

import torch

from lever_trainer.api import About, Batch, hookimpl, softmax_weights


class SoftmaxWeights:
    """``softmax(r / tau)`` over each query's candidates."""

    @hookimpl
    def about(self) -> About:
        """What ``lever-train plugins`` shows of this plugin."""
        return About(
            description="RCE weights softmax(r / tau) over each query's logged sequences",
            enabled_by_default=True,
        )

    @hookimpl
    def rce_weights(self, batch: Batch, rewards: torch.Tensor, temperature: float) -> torch.Tensor:
        """The weights of docs/algorithm.md#rce-loss-formula."""
        return softmax_weights(rewards, batch.cand_mask, temperature)


class Top1Only:
    """Cross-entropy on the first logged sequence, averaged over its steps."""

    @hookimpl
    def about(self) -> About:
        """What ``lever-train plugins`` shows of this plugin."""
        return About(
            description="RCE becomes plain cross-entropy on each query's first logged sequence",
            enable_flags=("--use_top1_only",),
        )

    @hookimpl
    def rce_weights(self, batch: Batch, rewards: torch.Tensor) -> torch.Tensor:
        """``1/S`` on column 0 (the first kept candidate), 0 elsewhere."""
        weights = torch.zeros_like(rewards)
        weights[:, 0] = 1.0 / batch.sequences.shape[-1]
        return weights.masked_fill(~batch.cand_mask, 0.0)


rce_softmax = SoftmaxWeights()
top1_only = Top1Only()

"""Gradient-free passes of a policy: sequence log-probs, validation, greedy selection."""

from __future__ import annotations

import torch

from .data import Batch, Embeddings, PoolTable, QueryTable, iter_batches
from .judge import Judge
from .losses import rce_loss, sequence_logprobs
from .metrics import SELECTION_METRICS, selection_metrics
from .policy import Policy
from .select import select_greedy
from .selectors import judge_selection

#: RCE temperature of the validation loss (docs/algorithm.md#validation).
VAL_TAU = 1.0
#: Smallest batch for gradient-free passes (reference log-probs, validation): without
#: activations to keep, larger batches use the matmul units better.
MIN_EVAL_BATCH = 128
#: The metrics :meth:`Evaluator.validate` returns (when the validation split is not empty).
VALIDATION_METRICS = ("val_loss", *SELECTION_METRICS)


def policy_logprobs(model: Policy, batch: Batch) -> torch.Tensor:
    """Teacher-forced sequence log-probs [B, G] of every candidate in ``batch``.

    The query and pool are encoded once; all G sequences decode against that encoding.
    """
    encoding = model.encode(batch.query_emb, batch.cand_emb, batch.pool_mask)
    logits, _ = model.decode(encoding, batch.pool_mask, batch.sequences)
    return sequence_logprobs(logits, batch.sequences)


class Evaluator:
    """Eval-mode passes of ``model`` over tables, in batches of at least 128 queries."""

    def __init__(
        self,
        model: Policy,
        emb: Embeddings,
        device: torch.device,
        batch_size: int,
        judge: Judge | None = None,
    ) -> None:
        self.model = model
        self.emb = emb
        self.device = device
        self.batch_size = max(batch_size, MIN_EVAL_BATCH)
        self.judge = judge

    @torch.no_grad()
    def logprobs(self, table: QueryTable) -> torch.Tensor:
        """Eval-mode sequence log-probs [Q, G] of every candidate of ``table`` (pads 0)."""
        was_training = self.model.training
        self.model.eval()
        out = torch.zeros(table.rewards_raw.shape)
        for batch in iter_batches(table, self.emb, self.batch_size):
            lp = policy_logprobs(self.model, batch.to(self.device)).cpu()
            out[batch.rows, : lp.shape[1]] = lp.masked_fill(~batch.cand_mask, 0.0)
        self.model.train(was_training)
        return out

    @torch.no_grad()
    def validate(self, table: QueryTable) -> dict[str, float]:
        """Validation RCE loss (raw rewards, tau = 1, eval mode) and selection metrics."""
        if len(table) == 0:
            return {}
        was_training = self.model.training
        self.model.eval()
        loss_sum = 0.0
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        for batch in iter_batches(table, self.emb, self.batch_size):
            b = batch.to(self.device)
            lp = policy_logprobs(self.model, b)
            loss_sum += float(rce_loss(lp, b.rewards_raw, b.cand_mask, VAL_TAU)) * len(b)
            for name, (values, defined) in selection_metrics(
                lp, b.rewards_raw, b.correct, b.cand_mask
            ).items():
                sums[name] = sums.get(name, 0.0) + float(values[defined].sum())
                counts[name] = counts.get(name, 0) + int(defined.sum())
        self.model.train(was_training)
        metrics = {"val_loss": loss_sum / len(table)}
        for name, total in sums.items():
            if counts[name]:
                metrics[name] = total / counts[name]
        if self.judge is not None:
            metrics.update(self.judged(table, table.seq_len))
        return metrics

    def judged(self, table: QueryTable | PoolTable, steps: int) -> dict[str, float]:
        """Downstream verdicts of the policy's free greedy selection over each whole pool:
        ``judge_correct@greedy`` and ``judge_reward@greedy`` (docs/algorithm.md#judging)."""
        assert self.judge is not None
        pools = table if isinstance(table, PoolTable) else PoolTable.from_table(table)
        picks = select_greedy(
            self.model, pools, self.emb, steps, self.batch_size, self.device
        ).picks
        scores = judge_selection(self.judge, pools, picks)
        return {f"{k}@greedy": v for k, v in scores.items()}


#: The order of the epoch line's metrics; a phase's ``log_metrics`` follow.
METRIC_ORDER = (
    "train_loss",
    "val_loss",
    "policy_reward@1",
    "random_reward",
    "oracle_reward",
    "normalized_gain",
    "policy_correct@1",
    "spearman",
    "judge_correct@greedy",
    "judge_reward@greedy",
)


def format_metrics(metrics: dict[str, float], extra: tuple[str, ...] = ()) -> str:
    """One-line rendering of an epoch's metrics, in a stable order."""
    keys = [*METRIC_ORDER, *(k for k in extra if k not in METRIC_ORDER)]
    return "  ".join(f"{k} {metrics[k]:.4f}" for k in keys if k in metrics)


__all__ = ["VALIDATION_METRICS", "Evaluator", "format_metrics", "policy_logprobs"]

"""Gradient-free passes of a policy: sequence log-probs, validation, greedy selection."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .data import Batch, Embeddings, PoolTable, QueryTable, iter_batches
from .judge import Judge
from .losses import rce_loss, sequence_logprobs, softmax_weights
from .metrics import CI_HIGH, CI_LOW, SELECTION_METRICS, mean_interval, selection_metrics
from .policy import Policy
from .select import select_greedy

#: RCE temperature of the validation loss (docs/algorithm.md#validation).
VAL_TAU = 1.0
#: Smallest batch for gradient-free passes (reference log-probs, validation): without
#: activations to keep, larger batches use the matmul units better.
MIN_EVAL_BATCH = 128
#: The metrics :meth:`Evaluator.validate` returns (when the validation split is not empty).
VALIDATION_METRICS = ("val_loss", *SELECTION_METRICS)
#: The metrics a judged validation adds (``--judge``).
JUDGED_METRICS = ("judge_correct@greedy", "judge_reward@greedy")
#: The validation metrics that are means over queries of something the policy decides:
#: :meth:`Evaluator.validation` gives each its per-query values and a 95 % interval
#: (``random_reward`` and ``oracle_reward`` describe the data, not the policy).
INTERVAL_METRICS = (
    "val_loss",
    "policy_reward@1",
    "policy_correct@1",
    "normalized_gain",
    "spearman",
    *JUDGED_METRICS,
)
#: The number of validation queries, in every validated epoch's metrics.
VAL_QUERIES = "val_queries"


def interval_names(names: tuple[str, ...]) -> tuple[str, ...]:
    """``name_ci_low``, ``name_ci_high`` of each name."""
    return tuple(f"{n}{suffix}" for n in names for suffix in (CI_LOW, CI_HIGH))


#: Every metric name a run's validation can report (``--best-metric`` accepts them all).
ALL_VALIDATION_METRICS = (
    *VALIDATION_METRICS,
    VAL_QUERIES,
    *interval_names(tuple(n for n in INTERVAL_METRICS if n not in JUDGED_METRICS)),
)
#: What a judged validation adds to :data:`ALL_VALIDATION_METRICS`.
ALL_JUDGED_METRICS = (*JUDGED_METRICS, *interval_names(JUDGED_METRICS))


@dataclass
class Validation:
    """One validation pass: the metrics (means, their 95 % intervals, ``val_queries``)
    and, for each of :data:`INTERVAL_METRICS` measured, the per-query values [n]
    (float64, in the table's row order, NaN where the metric is undefined for a query),
    which checkpoint selection compares pairwise."""

    metrics: dict[str, float] = field(default_factory=dict)
    per_query: dict[str, torch.Tensor] = field(default_factory=dict)


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

    def validate(self, table: QueryTable) -> dict[str, float]:
        """Validation RCE loss (raw rewards, tau = 1, eval mode) and selection metrics
        (and the judged ones with a judge): the means of :meth:`validation`."""
        metrics = self.validation(table).metrics
        return {k: v for k, v in metrics.items() if k in VALIDATION_METRICS + JUDGED_METRICS}

    @torch.no_grad()
    def validation(self, table: QueryTable) -> Validation:
        """The validation metrics with their uncertainty: the means (:meth:`validate`),
        ``val_queries``, a 95 % interval (``name_ci_low``, ``name_ci_high``; see
        :func:`~lever_trainer.metrics.mean_interval`) of each of :data:`INTERVAL_METRICS`,
        and their per-query values."""
        if len(table) == 0:
            return Validation()
        was_training = self.model.training
        self.model.eval()
        loss_sum = 0.0
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        parts: dict[str, list[torch.Tensor]] = {}
        for batch in iter_batches(table, self.emb, self.batch_size):
            b = batch.to(self.device)
            lp = policy_logprobs(self.model, b)
            loss_sum += float(rce_loss(lp, b.rewards_raw, b.cand_mask, VAL_TAU)) * len(b)
            weights = softmax_weights(b.rewards_raw, b.cand_mask, VAL_TAU)
            loss = -(weights * lp.masked_fill(~b.cand_mask, 0.0)).sum(-1)
            parts.setdefault("val_loss", []).append(loss.cpu())
            for name, (values, defined) in selection_metrics(
                lp, b.rewards_raw, b.correct, b.cand_mask
            ).items():
                sums[name] = sums.get(name, 0.0) + float(values[defined].sum())
                counts[name] = counts.get(name, 0) + int(defined.sum())
                if name in INTERVAL_METRICS:
                    parts.setdefault(name, []).append(values.masked_fill(~defined, math.nan).cpu())
        self.model.train(was_training)
        metrics = {"val_loss": loss_sum / len(table)}
        for name, total in sums.items():
            if counts[name]:
                metrics[name] = total / counts[name]
        per_query = {k: torch.cat(v).to(torch.float64) for k, v in parts.items()}
        if self.judge is not None:
            judged = self.judged_per_query(table, table.seq_len)
            for name, values in judged.items():
                metrics[name] = sum(values.tolist()) / max(len(values), 1)
            per_query.update(judged)
        metrics[VAL_QUERIES] = float(len(table))
        for name, values in per_query.items():
            _, low, high = mean_interval(values)
            metrics[f"{name}{CI_LOW}"], metrics[f"{name}{CI_HIGH}"] = low, high
        return Validation(metrics, per_query)

    def judged_per_query(
        self, table: QueryTable | PoolTable, steps: int
    ) -> dict[str, torch.Tensor]:
        """Downstream verdicts of the policy's free greedy selection over each whole pool,
        per query: ``judge_correct@greedy`` (``vqa_correct``) and ``judge_reward@greedy``
        (raw reward), each [n] float64 in the table's row order."""
        assert self.judge is not None
        pools = table if isinstance(table, PoolTable) else PoolTable.from_table(table)
        picks = select_greedy(
            self.model, pools, self.emb, steps, self.batch_size, self.device
        ).picks
        lengths = pools.pool_len.tolist()
        qids = pools.query_ids.tolist()
        pool_map = {
            q: row[:n] for q, row, n in zip(qids, pools.pool_ids.tolist(), lengths, strict=True)
        }
        rewards, correct = self.judge.rewards(qids, picks, pool_map)
        return {
            "judge_correct@greedy": torch.tensor(correct, dtype=torch.float64),
            "judge_reward@greedy": torch.tensor(rewards, dtype=torch.float64),
        }


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
    """One-line rendering of an epoch's metrics, in a stable order.

    A metric with a 95 % interval in ``metrics`` shows it in brackets
    (``judge_correct@greedy 0.8643 [0.797, 0.911]``); ``val_queries`` closes the line as
    ``(n = 140 validation queries)``.
    """
    keys = [*METRIC_ORDER, *(k for k in extra if k not in METRIC_ORDER)]
    parts = []
    for k in keys:
        if k not in metrics:
            continue
        text = f"{k} {metrics[k]:.4f}"
        low, high = metrics.get(f"{k}{CI_LOW}"), metrics.get(f"{k}{CI_HIGH}")
        if low is not None and high is not None and math.isfinite(low) and math.isfinite(high):
            text += f" [{low:.3f}, {high:.3f}]"
        parts.append(text)
    n = metrics.get(VAL_QUERIES)
    if parts and n is not None:
        parts.append(f"(n = {int(n)} validation queries, 95 % intervals)")
    return "  ".join(parts)


__all__ = [
    "ALL_JUDGED_METRICS",
    "ALL_VALIDATION_METRICS",
    "INTERVAL_METRICS",
    "JUDGED_METRICS",
    "VALIDATION_METRICS",
    "VAL_QUERIES",
    "Evaluator",
    "Validation",
    "format_metrics",
    "interval_names",
    "policy_logprobs",
]

"""Query tables and batches: padded per-query tensors with explicit masks.

A :class:`QueryTable` holds one row per query, every per-candidate field a padded
tensor with explicit lengths, built once at load. A :class:`Batch` is a slice of that
table plus the embeddings it points at, with masks for padded pool entries and padded
candidates (ARCHITECTURE rule 9).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

import torch

from ..errors import LeverError

if TYPE_CHECKING:
    from .embeddings import Embeddings


def length_mask(width: int, lengths: torch.Tensor) -> torch.Tensor:
    """[Q, width] True for the first ``lengths[q]`` entries of each row."""
    return torch.arange(width).unsqueeze(0) < lengths.unsqueeze(1)


def max_length(lengths: torch.Tensor, rows: torch.Tensor) -> int:
    """The largest of ``lengths[rows]`` (0 for no rows): the width rows ``rows`` need."""
    return int(lengths[rows].max()) if len(rows) else 0


def gather_cand_emb(emb: Embeddings, pool_ids: torch.Tensor) -> torch.Tensor:
    """The candidate embeddings [Q, K, d] of padded pools ``pool_ids`` [Q, K]."""
    # index_select is several times faster than advanced indexing for this gather
    return emb.cand.index_select(0, pool_ids.reshape(-1)).view(*pool_ids.shape, emb.cand.shape[1])


@dataclass
class QueryTable:
    """Per-query tensors, padded to the largest pool and group of the table.

    ``pool_ids`` [Q, K] global ids (padding 0, see ``pool_len``), ``sequences``
    [Q, G, S] pool positions (padding 0, see ``group_len``), ``rewards_raw``,
    ``rewards_norm``, ``correct`` [Q, G]. ``cand_index`` [Q, G] is each row's index in
    the query's ``pointer_candidates`` list, for messages.
    """

    query_ids: torch.Tensor
    pool_ids: torch.Tensor
    pool_len: torch.Tensor
    sequences: torch.Tensor
    group_len: torch.Tensor
    rewards_raw: torch.Tensor
    rewards_norm: torch.Tensor
    correct: torch.Tensor
    cand_index: torch.Tensor

    def __len__(self) -> int:
        return int(self.query_ids.shape[0])

    @property
    def seq_len(self) -> int:
        """Sequence length S shared by every candidate."""
        return int(self.sequences.shape[-1])

    @property
    def num_candidates(self) -> int:
        """Number of real candidate sequences in the table."""
        return int(self.group_len.sum())

    def select(self, rows: torch.Tensor) -> QueryTable:
        """Rows ``rows`` of the table, trimmed to their own largest pool and group."""
        k = max_length(self.pool_len, rows)
        g = max_length(self.group_len, rows)
        return QueryTable(
            query_ids=self.query_ids[rows],
            pool_ids=self.pool_ids[rows, :k],
            pool_len=self.pool_len[rows],
            sequences=self.sequences[rows, :g],
            group_len=self.group_len[rows],
            rewards_raw=self.rewards_raw[rows, :g],
            rewards_norm=self.rewards_norm[rows, :g],
            correct=self.correct[rows, :g],
            cand_index=self.cand_index[rows, :g],
        )

    def pool_mask(self) -> torch.Tensor:
        """[Q, K] True for real pool entries."""
        return length_mask(self.pool_ids.shape[1], self.pool_len)

    def cand_mask(self) -> torch.Tensor:
        """[Q, G] True for real candidate sequences."""
        return length_mask(self.sequences.shape[1], self.group_len)


@dataclass
class Batch:
    """Model-ready tensors for a few queries, with explicit padding masks.

    ``query_emb`` [B, d], ``cand_emb`` [B, K, d], ``pool_mask`` [B, K],
    ``sequences`` [B, G, S], ``cand_mask`` [B, G], ``rewards_raw``,
    ``rewards_norm``, ``correct`` and (when known) ``ref_logprobs`` [B, G];
    ``rows`` [B] are the batch's row numbers in its table, ``query_ids`` [B].
    """

    rows: torch.Tensor
    query_ids: torch.Tensor
    query_emb: torch.Tensor
    cand_emb: torch.Tensor
    pool_mask: torch.Tensor
    sequences: torch.Tensor
    cand_mask: torch.Tensor
    rewards_raw: torch.Tensor
    rewards_norm: torch.Tensor
    correct: torch.Tensor
    ref_logprobs: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> Batch:
        """The same batch with every tensor on ``device``."""
        moved = {
            f.name: (v.to(device) if isinstance(v := getattr(self, f.name), torch.Tensor) else v)
            for f in fields(self)
        }
        return Batch(**moved)

    def __len__(self) -> int:
        return int(self.rows.shape[0])


def _pad(flat: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Rows of ``flat`` (concatenated segments of ``lengths``) as a zero-padded [Q, max] tensor."""
    width = int(lengths.max()) if len(lengths) else 0
    rows = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
    starts = torch.cumsum(lengths, 0) - lengths
    cols = torch.arange(len(rows)) - starts[rows]
    out = torch.zeros((len(lengths), width, *flat.shape[1:]), dtype=flat.dtype)
    out[rows, cols] = flat
    return out


def split_train_val(
    table: QueryTable, val_ratio: float, seed: int | None = None
) -> tuple[QueryTable, QueryTable]:
    """Split off ``val_ratio`` of the queries for validation; ``floor(n * (1 - val_ratio))``
    (at least one) train.

    Without ``seed``: the highest query ids are validation (the same split for every
    seed). With ``seed``: the validation queries are drawn by a permutation seeded with
    it. Either way both parts are in query-id order.
    """
    if not 0.0 <= val_ratio < 1.0:
        raise LeverError(f"--val-ratio: expected a value in [0, 1), got {val_ratio}")
    order = torch.argsort(table.query_ids, stable=True)
    # the epsilon keeps e.g. 20 * (1 - 0.9) = 1.9999999999999996 from flooring to 1
    n_train = math.floor(len(table) * (1.0 - val_ratio) + 1e-9)
    n_train = max(1, min(len(table), n_train))
    if seed is None:
        return table.select(order[:n_train]), table.select(order[n_train:])
    drawn = order[torch.randperm(len(order), generator=torch.Generator().manual_seed(seed))]
    train_rows, val_rows = drawn[:n_train], drawn[n_train:]
    by_id = (table.query_ids[train_rows].argsort(), table.query_ids[val_rows].argsort())
    return table.select(train_rows[by_id[0]]), table.select(val_rows[by_id[1]])


def make_batch(
    table: QueryTable,
    rows: torch.Tensor,
    emb: Embeddings,
    ref_logprobs: torch.Tensor | None = None,
) -> Batch:
    """Gather rows of ``table`` and their embeddings into a padded :class:`Batch`."""
    sub = table.select(rows)
    return Batch(
        rows=rows,
        query_ids=sub.query_ids,
        query_emb=emb.query.index_select(0, sub.query_ids),
        cand_emb=gather_cand_emb(emb, sub.pool_ids),
        pool_mask=sub.pool_mask(),
        sequences=sub.sequences,
        cand_mask=sub.cand_mask(),
        rewards_raw=sub.rewards_raw,
        rewards_norm=sub.rewards_norm,
        correct=sub.correct,
        ref_logprobs=None if ref_logprobs is None else ref_logprobs[rows, : sub.sequences.shape[1]],
    )


def iter_batches(
    table: QueryTable,
    emb: Embeddings,
    batch_size: int,
    order: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
) -> Iterable[Batch]:
    """Batches of ``batch_size`` rows in ``order`` (default: table order)."""
    rows = torch.arange(len(table)) if order is None else order
    for start in range(0, len(rows), batch_size):
        yield make_batch(table, rows[start : start + batch_size], emb, ref_logprobs)


def gather_groups(
    batch: Batch, keep: torch.Tensor, rewards: torch.Tensor
) -> tuple[Batch, torch.Tensor]:
    """Compact a batch to the candidates in ``keep`` [B, G]; returns it and their rewards."""
    width = max(int(keep.sum(-1).max()), 1)
    # Kept entries first, in their original order (stable sort on the keep flag).
    idx = torch.sort(keep.to(torch.int8), dim=-1, descending=True, stable=True).indices[:, :width]
    s = batch.sequences.shape[-1]
    ref = batch.ref_logprobs
    compact = Batch(
        rows=batch.rows,
        query_ids=batch.query_ids,
        query_emb=batch.query_emb,
        cand_emb=batch.cand_emb,
        pool_mask=batch.pool_mask,
        sequences=batch.sequences.gather(1, idx.unsqueeze(-1).expand(-1, -1, s)),
        cand_mask=keep.gather(1, idx),
        rewards_raw=batch.rewards_raw.gather(1, idx),
        rewards_norm=batch.rewards_norm.gather(1, idx),
        correct=batch.correct.gather(1, idx),
        ref_logprobs=None if ref is None else ref.gather(1, idx),
    )
    return compact, rewards.gather(1, idx)

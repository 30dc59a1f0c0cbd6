"""Greedy selection of demonstrations with a trained policy."""

from __future__ import annotations

import torch

from .data import Embeddings, QueryTable, iter_batches
from .model import PointerPolicy


@torch.no_grad()
def select_demonstrations(
    model: PointerPolicy,
    table: QueryTable,
    emb: Embeddings,
    steps: int,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Global ids [Q, steps] the policy picks greedily from each query's pool (eval mode)."""
    was_training = model.training
    model.eval()
    picks = torch.zeros(len(table), steps, dtype=torch.long)
    for batch in iter_batches(table, emb, batch_size):
        b = batch.to(device)
        z, keys = model.encode(b.query_emb, b.cand_emb, b.pool_mask)
        _, preds = model.decode(z, keys, b.pool_mask, None, steps)
        positions = preds[:, 0].cpu()
        picks[batch.rows] = table.pool_ids[batch.rows].gather(1, positions)
    model.train(was_training)
    return picks

"""Greedy selection of demonstrations with a trained policy (SPEC section 9)."""

from __future__ import annotations

import torch

from .data import Embeddings, QueryTable, iter_batches
from .errors import LeverError
from .policy import Policy


@torch.no_grad()
def select_demonstrations(
    model: Policy,
    table: QueryTable,
    emb: Embeddings,
    steps: int,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
) -> list[list[int]]:
    """Global ids the policy picks greedily from each query's pool (eval mode), in row order.

    A prediction past the pool (a STOP item, ``model.extra_items``) ends a query's list
    early, so a policy with STOP may return fewer than ``steps`` ids. A policy whose
    scores are NaN or +inf (weights that are absurd though finite) is a
    :class:`LeverError`: its picks would be arbitrary.
    """
    was_training = model.training
    model.eval()
    picks: list[list[int]] = [[] for _ in range(len(table))]
    for batch in iter_batches(table, emb, batch_size):
        b = batch.to(device)
        encoding = model.encode(b.query_emb, b.cand_emb, b.pool_mask)
        logits, preds = model.decode(encoding, b.pool_mask, None, steps)
        broken = torch.isnan(logits) | (logits == float("inf"))
        if bool(broken.any()):
            row = int(broken.flatten(1).any(1).nonzero()[0, 0])
            raise LeverError(
                f"the policy's scores for query {int(batch.query_ids[row])} are not finite "
                "(NaN or inf): it is not a usable model"
            )
        positions = preds[:, 0].cpu()  # [B, steps]
        pool_ids = table.pool_ids[batch.rows]
        pool_len = table.pool_len[batch.rows]
        for i, row in enumerate(batch.rows.tolist()):
            chosen: list[int] = []
            for pos in positions[i].tolist():
                if pos >= int(pool_len[i]):  # STOP (or beyond the real pool)
                    break
                chosen.append(int(pool_ids[i, pos]))
            picks[row] = chosen
    model.train(was_training)
    return picks

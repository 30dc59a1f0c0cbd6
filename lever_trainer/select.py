"""Free greedy selection with a trained policy (SPEC section 9): what ``select`` returns."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .data import Embeddings, PoolTable, QueryTable, pool_batches
from .policy import Policy


@dataclass
class Selection:
    """Each query's picks (global ids, in sequence order) and, per pick, the probability the
    policy gave it at its step."""

    query_ids: list[int]
    picks: list[list[int]]
    scores: list[list[float]]


@torch.no_grad()
def select_greedy(
    model: Policy,
    pools: PoolTable | QueryTable,
    emb: Embeddings,
    steps: int,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
) -> Selection:
    """The policy's greedy decode over each query's whole pool, in eval mode.

    A prediction past the pool (a STOP item, ``model.extra_items``) ends a query's list,
    so a policy with STOP may return fewer than ``steps`` ids.
    """
    was_training = model.training
    model.eval()
    query_ids: list[int] = []
    picks: list[list[int]] = []
    scores: list[list[float]] = []
    for batch in pool_batches(pools, emb, batch_size):
        b = batch.to(device)
        encoding = model.encode(b.query_emb, b.cand_emb, b.pool_mask)
        logits, preds = model.decode(encoding, b.pool_mask, None, steps)
        positions = preds[:, 0]  # [B, S]
        probs = torch.softmax(logits[:, 0].float(), dim=-1).gather(-1, positions.unsqueeze(-1))
        pool_len = b.pool_mask.sum(-1, keepdim=True)
        # everything from the first STOP on is dropped
        keep = (positions < pool_len).to(torch.int64).cumprod(dim=-1).bool().cpu()
        ids = batch.pool_ids.gather(1, positions.cpu().clamp_max(batch.pool_ids.shape[1] - 1))
        for row_ids, row_keep, row_p in zip(
            ids.tolist(), keep.tolist(), probs.squeeze(-1).cpu().tolist(), strict=True
        ):
            n = sum(row_keep)
            picks.append(row_ids[:n])
            scores.append([round(p, 6) for p in row_p[:n]])
        query_ids += batch.query_ids.tolist()
    model.train(was_training)
    return Selection(query_ids, picks, scores)


def select_demonstrations(
    model: Policy,
    table: PoolTable | QueryTable,
    emb: Embeddings,
    steps: int,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
) -> list[list[int]]:
    """Global ids the policy picks greedily from each query's pool, in table order."""
    return select_greedy(model, table, emb, steps, batch_size, device).picks

"""Free greedy selection with a trained policy (see docs/algorithm.md): what ``select`` returns."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .data import Embeddings, PoolTable, QueryTable, pool_batches
from .errors import LeverError
from .policy import Policy


@dataclass
class Selection:
    """Each query's picks (global ids, in sequence order) and, per pick, the probability the
    policy gave it at its step (empty lists unless asked for)."""

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
    with_scores: bool = False,
) -> Selection:
    """The policy's greedy decode over each query's whole pool, in eval mode.

    A prediction past the pool (a STOP item, ``model.extra_items``) ends a query's list,
    so a policy with STOP may return fewer than ``steps`` ids. A policy whose scores are
    NaN or +inf (weights that are absurd though finite) is a :class:`LeverError`: its
    picks would be arbitrary.
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
        broken = torch.isnan(logits) | (logits == float("inf"))
        if bool(broken.any()):
            row = int(broken.flatten(1).any(1).nonzero()[0, 0])
            raise LeverError(
                f"the policy's scores for query {int(batch.query_ids[row])} are not finite "
                "(NaN or inf): it is not a usable model"
            )
        positions = preds[:, 0]  # [B, S]
        pool_len = b.pool_mask.sum(-1, keepdim=True)
        # everything from the first STOP on is dropped
        kept = (positions < pool_len).to(torch.int64).cumprod(dim=-1).sum(-1).tolist()
        ids = batch.pool_ids.gather(1, positions.cpu().clamp_max(batch.pool_ids.shape[1] - 1))
        picks += [row[:n] for row, n in zip(ids.tolist(), kept, strict=True)]
        if with_scores:
            probs = torch.softmax(logits[:, 0].float(), dim=-1)
            chosen = probs.gather(-1, positions.unsqueeze(-1)).squeeze(-1).cpu().tolist()
            scores += [[round(p, 6) for p in row[:n]] for row, n in zip(chosen, kept, strict=True)]
        else:
            scores += [[] for _ in kept]
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

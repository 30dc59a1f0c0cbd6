"""Selectors judged by the downstream model (docs/algorithm.md#judging): a policy's free greedy
selection and the baselines a selector must beat.

* ``cosine``: the S pool items most cosine-similar to the query, most similar first
  (ties: lower pool position first); ``cosine-reversed``: the same items, most
  similar last;
* ``random``: an ordered sequence of S distinct pool items drawn uniformly. Its exact
  expectation over every ordered sequence when the judge is cheap and a pool holds at
  most ``exhaustive_limit`` of them, else the mean over 20 seeded draws;
* ``best``: the best ordered sequence of each pool (cheap judges only).

Every selector is scored by ``judge_correct`` (mean ``vqa_correct``) and
``judge_reward`` (mean raw reward of the run's reward mode) over the queries.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch

from .data import Embeddings, PoolTable, pool_batches
from .judge import Judge

#: Largest number of ordered sequences per pool judged for the exact random/best figures.
EXHAUSTIVE_LIMIT = 5000
#: Seeded draws of the random baseline when it cannot be exact.
RANDOM_DRAWS = 20


def cosine_selection(
    pools: PoolTable, emb: Embeddings, steps: int, reverse: bool = False
) -> list[list[int]]:
    """The ``steps`` most cosine-similar pool items per query (most similar first, or
    last with ``reverse``); ties go to the lower pool position."""
    out: list[list[int]] = []
    for batch in pool_batches(pools, emb, 1024):
        q = torch.nn.functional.normalize(batch.query_emb, dim=-1)
        c = torch.nn.functional.normalize(batch.cand_emb, dim=-1)
        sim = torch.einsum("bd,bkd->bk", q, c).masked_fill(~batch.pool_mask, float("-inf"))
        order = torch.sort(sim, dim=-1, descending=True, stable=True).indices[:, :steps]
        ids = batch.pool_ids.gather(1, order)
        for row in ids.tolist():
            out.append(row[::-1] if reverse else row)
    return out


def judge_selection(
    judge: Judge,
    pools: PoolTable,
    picks: Sequence[Sequence[int]],
    pool_map: dict[int, list[int]] | None = None,
) -> dict[str, float]:
    """Mean ``vqa_correct`` and raw reward of one selection per query (``pool_map``:
    :func:`_pool_map` of ``pools``, when the caller has it already)."""
    return means(judge_per_query(judge, pools, picks, pool_map))


def judge_per_query(
    judge: Judge,
    pools: PoolTable,
    picks: Sequence[Sequence[int]],
    pool_map: dict[int, list[int]] | None = None,
) -> dict[str, list[float]]:
    """``judge_correct`` and ``judge_reward`` of one selection per query, query by query
    (in the order of ``pools``)."""
    qids = pools.query_ids.tolist()
    if pool_map is None:
        pool_map = _pool_map(pools)
    rewards, correct = judge.rewards(qids, picks, pool_map)
    return {"judge_correct": [float(c) for c in correct], "judge_reward": list(rewards)}


def means(per_query: dict[str, list[float]]) -> dict[str, float]:
    """The mean of each per-query column."""
    return {k: sum(v) / max(len(v), 1) for k, v in per_query.items()}


def _pool_map(pools: PoolTable) -> dict[int, list[int]]:
    lengths = pools.pool_len.tolist()
    return {
        q: row[:n]
        for q, row, n in zip(
            pools.query_ids.tolist(), pools.pool_ids.tolist(), lengths, strict=True
        )
    }


def ordered_sequences(pool_size: int, steps: int) -> int:
    """How many ordered sequences of ``steps`` distinct items a pool holds."""
    return math.perm(pool_size, steps) if pool_size >= steps else 0


def exhaustive_baselines(
    judge: Judge, pools: PoolTable, steps: int, limit: int = EXHAUSTIVE_LIMIT
) -> dict[str, dict[str, list[float]]] | None:
    """Exact ``random`` expectation and ``best`` sequence of each query, judging every
    ordered sequence (per query, in the order of ``pools``); None when the judge is not
    cheap or a pool has more than ``limit`` sequences."""
    if not judge.env.cheap:
        return None
    pool_map = _pool_map(pools)
    if any(ordered_sequences(len(p), steps) > limit for p in pool_map.values()):
        return None
    out: dict[str, dict[str, list[float]]] = {
        name: {"judge_correct": [], "judge_reward": []} for name in ("random", "best")
    }
    for q, pool in pool_map.items():
        seqs = [list(s) for s in itertools.permutations(pool, steps)]
        rewards, correct = judge.rewards([q] * len(seqs), seqs, {q: pool})
        out["random"]["judge_correct"].append(sum(correct) / len(seqs))
        out["random"]["judge_reward"].append(sum(rewards) / len(seqs))
        out["best"]["judge_correct"].append(float(max(correct)))
        out["best"]["judge_reward"].append(max(rewards))
    return out


def random_baseline(
    judge: Judge, pools: PoolTable, steps: int, draws: int = RANDOM_DRAWS
) -> dict[str, list[float]]:
    """Per query, the mean over ``draws`` seeded uniform draws of one ordered sequence."""
    pool_map = _pool_map(pools)
    total = {"judge_correct": [0.0] * len(pool_map), "judge_reward": [0.0] * len(pool_map)}
    for seed in range(draws):
        gen = torch.Generator().manual_seed(seed)
        picks = []
        for pool in pool_map.values():
            order = torch.randperm(len(pool), generator=gen)[:steps].tolist()
            picks.append([pool[i] for i in order])
        for key, values in judge_per_query(judge, pools, picks, pool_map).items():
            total[key] = [t + v / draws for t, v in zip(total[key], values, strict=True)]
    return total


__all__ = [
    "EXHAUSTIVE_LIMIT",
    "cosine_selection",
    "exhaustive_baselines",
    "judge_per_query",
    "judge_selection",
    "means",
    "ordered_sequences",
    "random_baseline",
]

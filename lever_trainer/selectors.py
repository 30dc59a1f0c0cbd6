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
    qids = pools.query_ids.tolist()
    if pool_map is None:
        pool_map = _pool_map(pools)
    rewards, correct = judge.rewards(qids, picks, pool_map)
    n = max(len(qids), 1)
    return {"judge_correct": sum(correct) / n, "judge_reward": sum(rewards) / n}


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
) -> dict[str, dict[str, float]] | None:
    """Exact ``random`` expectation and ``best`` sequence, judging every ordered sequence;
    None when the judge is not cheap or a pool has more than ``limit`` sequences."""
    if not judge.env.cheap:
        return None
    pool_map = _pool_map(pools)
    if any(ordered_sequences(len(p), steps) > limit for p in pool_map.values()):
        return None
    sums = {"random": [0.0, 0.0], "best": [0.0, 0.0]}
    for q, pool in pool_map.items():
        seqs = [list(s) for s in itertools.permutations(pool, steps)]
        rewards, correct = judge.rewards([q] * len(seqs), seqs, {q: pool})
        sums["random"][0] += sum(correct) / len(seqs)
        sums["random"][1] += sum(rewards) / len(seqs)
        sums["best"][0] += max(correct)
        sums["best"][1] += max(rewards)
    n = max(len(pool_map), 1)
    return {name: {"judge_correct": c / n, "judge_reward": r / n} for name, (c, r) in sums.items()}


def random_baseline(
    judge: Judge, pools: PoolTable, steps: int, draws: int = RANDOM_DRAWS
) -> dict[str, float]:
    """Mean over ``draws`` seeded uniform draws of one ordered sequence per query."""
    pool_map = _pool_map(pools)
    correct_sum = reward_sum = 0.0
    for seed in range(draws):
        gen = torch.Generator().manual_seed(seed)
        picks = []
        for pool in pool_map.values():
            order = torch.randperm(len(pool), generator=gen)[:steps].tolist()
            picks.append([pool[i] for i in order])
        scores = judge_selection(judge, pools, picks, pool_map)
        correct_sum += scores["judge_correct"]
        reward_sum += scores["judge_reward"]
    return {"judge_correct": correct_sum / draws, "judge_reward": reward_sum / draws}


__all__ = [
    "EXHAUSTIVE_LIMIT",
    "cosine_selection",
    "exhaustive_baselines",
    "judge_selection",
    "ordered_sequences",
    "random_baseline",
]

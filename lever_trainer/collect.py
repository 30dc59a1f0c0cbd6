"""Collecting RL data (docs/collecting.md): judged demonstration sequences for every query.

For each query of a pool file, a beam search over ordered sequences of ``S`` distinct
items of the query's pool, scored by the run's judge:

* step 1 judges every candidate item alone (a sequence of length 1);
* step ``t`` extends each of the ``B`` kept sequences by every candidate item it does
  not hold yet, judges the extensions (length ``t``) and keeps the ``B`` best;
* after step ``S`` the kept sequences are written, best first (``beam_rank`` 0).

"Best" is the higher value of one verdict field (``--beam-score``, by default
``vqa_gt_prob``, the judge's probability of the right answer); on a tie the sequence
whose pool positions come first (compared position by position) wins, so that the
result never depends on the order verdicts arrive in. Candidate items are the whole
pool, or its ``K`` items most cosine-similar to the query (``--beam-candidates``).

Optional extra sequences are judged and written beside the beam: ``N`` seeded uniform
draws (``random``) and the cosine top-``S`` in both orders (``cosine``,
``cosine-reversed``). A sequence found by two methods is written once, under the
first of beam, cosine, cosine-reversed, random.

Queries go through the search together, a chunk at a time, so that every step of a
chunk is one round for the judge driver (batches, concurrency, retries); each verdict
is stored as its batch returns, and a collect run again (after a kill, say) finds in
the store all it had asked. :func:`merge_parts` joins the outputs of ``--shard`` runs.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .data import Embeddings, PoolTable
from .errors import LeverError
from .judge import VERDICT_FIELDS, Judge
from .selectors import cosine_selection

#: The ``gen_method`` of each kind of collected sequence, in the order they are written.
GEN_BEAM, GEN_COSINE, GEN_COSINE_REVERSED, GEN_RANDOM = (
    "beam",
    "cosine",
    "cosine-reversed",
    "random",
)
#: The verdict fields the beam search may rank by.
SCORE_FIELDS = VERDICT_FIELDS
#: Queries searched together (one judge round per step of each chunk).
CHUNK_QUERIES = 256
#: ``_meta.source`` of a collect output (checked by ``--merge``).
SOURCE = "lever-train collect"


@dataclass(frozen=True)
class CollectSpec:
    """What to collect per query: ``shots`` items per sequence, ``beam_size`` beams ranked
    by the verdict field ``score``, extensions drawn from the ``candidates`` items most
    cosine-similar to the query (None: the whole pool), ``random`` uniform sequences
    (seeded by ``seed`` and the query id) and the two ``cosine`` sequences."""

    shots: int = 2
    beam_size: int = 5
    score: str = "vqa_gt_prob"
    candidates: int | None = None
    random: int = 0
    cosine: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if self.score not in SCORE_FIELDS:
            raise LeverError(
                f"--beam-score: {self.score!r} is not a verdict field "
                f"(expected one of {', '.join(SCORE_FIELDS)})"
            )
        if self.candidates is not None and self.candidates < self.shots:
            raise LeverError(
                f"--beam-candidates {self.candidates}: fewer than the {self.shots} items of "
                "a sequence (--shots)"
            )

    @property
    def needs_embeddings(self) -> bool:
        """Whether the pool items must be ranked by cosine similarity."""
        return self.cosine or self.candidates is not None

    def meta(self) -> dict[str, Any]:
        """The settings as recorded in the output's ``_meta``."""
        return {
            "shots": self.shots,
            "beam_size": self.beam_size,
            "beam_score": self.score,
            "beam_candidates": self.candidates,
            "random": self.random,
            "cosine": self.cosine,
            "seed": self.seed,
        }


# ---------------------------------------------------------------- cost
def beam_verdicts(candidates: int, shots: int, beam_size: int) -> int:
    """Judged sequences of one query's beam search over ``candidates`` items:
    ``c`` at step 1, then ``b_{t-1} * (c - t + 1)`` at step ``t``, where
    ``b_t = min(B, b_{t-1} * (c - t + 1))`` beams survive step ``t`` (``b_0 = 1``)."""
    if candidates < shots:
        return 0
    total, beams = 0, 1
    for t in range(1, shots + 1):
        extensions = beams * (candidates - t + 1)
        total += extensions
        beams = min(beam_size, extensions)
    return total


def extra_sequences(pool_size: int, spec: CollectSpec) -> int:
    """Sequences judged beside the beam for one query (random draws and cosine ones)."""
    cosine = (1 if spec.shots == 1 else 2) if spec.cosine else 0
    return min(spec.random, math.perm(pool_size, spec.shots)) + cosine


def query_verdicts(pool_size: int, spec: CollectSpec) -> int:
    """Sequences judged for one query with a pool of ``pool_size`` items."""
    candidates = min(pool_size, spec.candidates or pool_size)
    return beam_verdicts(candidates, spec.shots, spec.beam_size) + extra_sequences(pool_size, spec)


# ---------------------------------------------------------------- shards
def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` as ``(I, N)`` with ``0 <= I < N``; a :class:`LeverError` naming
    ``--shard`` otherwise."""
    index, slash, count = text.strip().partition("/")
    try:
        i, n = int(index), int(count)
    except ValueError:
        i = n = -1
    if not slash or n < 1 or not 0 <= i < n:
        raise LeverError(
            f"--shard: {text!r} is not a part I/N with 0 <= I < N (e.g. 0/4 for the first "
            "of four parts)"
        )
    return i, n


def shard_rows(n_queries: int, index: int, count: int) -> list[int]:
    """The rows of part ``index`` of ``count``: ``index, index + count, ...``."""
    return list(range(index, n_queries, count))


# ---------------------------------------------------------------- the search
@dataclass
class Scored:
    """One judged sequence of a query: global ids, its verdict and its score."""

    sequence: tuple[int, ...]
    verdict: Mapping[str, Any]
    score: float


def _score(
    verdict: Mapping[str, Any], field: str, judge: Judge, q: int, seq: Sequence[int]
) -> float:
    value = verdict.get(field)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        others = ", ".join(f for f in SCORE_FIELDS if f != field)
        raise LeverError(
            f"--beam-score {field}: environment {judge.name} gives no usable {field} "
            f"(query {q}, sequence {list(seq)}: {value!r}); rank by another field ({others})"
        )
    return float(value)


def _rank(scored: list[Scored], position: Mapping[int, int]) -> list[Scored]:
    """Best first: higher score, then the sequence whose pool positions come first."""
    return sorted(scored, key=lambda s: (-s.score, [position[g] for g in s.sequence]))


def beam_search(
    judge: Judge,
    pools: Mapping[int, Sequence[int]],
    candidates: Mapping[int, Sequence[int]],
    spec: CollectSpec,
    on_round: Callable[[int], None] | None = None,
) -> dict[int, list[Scored]]:
    """The ``beam_size`` best sequences of ``shots`` items of every query (best first),
    searched together: one judge round per step. ``pools`` gives each query's pool
    (positions for the tie-break, and the pool stored with each verdict);
    ``candidates`` the items its beams may be extended with. ``on_round(n)`` is told
    after each round how many sequences it judged."""
    positions = {q: {g: i for i, g in enumerate(pool)} for q, pool in pools.items()}
    beams: dict[int, list[tuple[int, ...]]] = {q: [()] for q in candidates}
    kept: dict[int, list[Scored]] = {q: [] for q in candidates}
    for _step in range(spec.shots):
        qids: list[int] = []
        seqs: list[tuple[int, ...]] = []
        for q, prefixes in beams.items():
            for prefix in prefixes:
                for g in candidates[q]:
                    if g not in prefix:
                        qids.append(q)
                        seqs.append((*prefix, g))
        verdicts = judge.verdicts(qids, seqs, pools)
        by_query: dict[int, list[Scored]] = {q: [] for q in beams}
        for q, seq, verdict in zip(qids, seqs, verdicts, strict=True):
            by_query[q].append(Scored(seq, verdict, _score(verdict, spec.score, judge, q, seq)))
        for q, scored in by_query.items():
            kept[q] = _rank(scored, positions[q])[: spec.beam_size]
            beams[q] = [s.sequence for s in kept[q]]
        if on_round is not None:
            on_round(len(seqs))
    return kept


def random_sequences(
    pool: Sequence[int], shots: int, n: int, seed: int, query: int
) -> list[tuple[int, ...]]:
    """``n`` distinct ordered sequences of ``shots`` distinct pool items, drawn uniformly
    (all of them, in a random order, when the pool holds no more than ``n``). The draw
    depends only on ``seed``, the query id and the pool, so a query gets the same
    sequences whichever shard collects it."""
    rng = random.Random(f"{seed}/{query}")
    total = math.perm(len(pool), shots)
    want = min(n, total)
    if total <= 4 * want:
        every = list(itertools.permutations(pool, shots))
        return rng.sample(every, want)
    found: dict[tuple[int, ...], None] = {}
    while len(found) < want:
        found.setdefault(tuple(rng.sample(list(pool), shots)), None)
    return list(found)


@dataclass
class QueryResult:
    """The collected sequences of one query, in the order they are written."""

    query: int
    pool: list[int]
    beam: list[Scored]
    extras: list[tuple[str, Scored]]

    def entry(self) -> dict[str, Any]:
        """The query's RL data value: its pool and one candidate per distinct sequence."""
        position = {g: i for i, g in enumerate(self.pool)}
        cands: list[dict[str, Any]] = []
        seen: set[tuple[int, ...]] = set()
        rows: list[tuple[str, int | None, Scored]]
        rows = [(GEN_BEAM, rank, s) for rank, s in enumerate(self.beam)]
        rows += [(method, None, s) for method, s in self.extras]
        for method, rank, scored in rows:
            if scored.sequence in seen:
                continue
            seen.add(scored.sequence)
            cand: dict[str, Any] = {
                "pointer": [position[g] for g in scored.sequence],
                "pointer_global": list(scored.sequence),
                "gen_method": method,
                "beam_rank": rank,
                "beam_score": scored.score,
                **scored.verdict,
            }
            if isinstance(cand.get("vqa_correct"), float) and cand["vqa_correct"] in (0.0, 1.0):
                cand["vqa_correct"] = int(cand["vqa_correct"])
            cands.append(cand)
        return {"candidate_pool_ids": list(self.pool), "pointer_candidates": cands}


def _pool_lists(pools: PoolTable) -> list[tuple[int, list[int]]]:
    lengths = pools.pool_len.tolist()
    return [
        (q, row[:n])
        for q, row, n in zip(
            pools.query_ids.tolist(), pools.pool_ids.tolist(), lengths, strict=True
        )
    ]


def check_pools(pools: PoolTable, spec: CollectSpec, where: str) -> None:
    """Every pool must hold at least ``shots`` items: one line naming the first query
    that does not."""
    short = pools.pool_len < spec.shots
    if bool(short.any()):
        row = int(short.nonzero()[0, 0])
        raise LeverError(
            f"{where}: query {int(pools.query_ids[row])}'s pool holds "
            f"{int(pools.pool_len[row])} ids, fewer than --shots {spec.shots}"
        )


def collect_chunk(
    judge: Judge,
    pools: PoolTable,
    emb: Embeddings | None,
    spec: CollectSpec,
    on_round: Callable[[int], None] | None = None,
) -> list[QueryResult]:
    """Collect the sequences of every query of ``pools`` (one chunk), in table order."""
    if spec.needs_embeddings and emb is None:
        raise LeverError("--cosine and --beam-candidates rank pool items by cosine: give --img-emb")
    lists = _pool_lists(pools)
    pool_map = dict(lists)
    if spec.candidates is not None:
        assert emb is not None
        ranked = cosine_selection(pools, emb, min(spec.candidates, pools.pool_ids.shape[1]))
        candidates = {
            q: ranked[i][: min(spec.candidates, len(pool))] for i, (q, pool) in enumerate(lists)
        }
    else:
        candidates = dict(lists)
    beams = beam_search(judge, pool_map, candidates, spec, on_round)
    # the extra sequences: every query's in one round
    extras: list[tuple[int, str, tuple[int, ...]]] = []
    if spec.cosine:
        assert emb is not None
        top = cosine_selection(pools, emb, spec.shots)
        for (q, _), ids in zip(lists, top, strict=True):
            extras.append((q, GEN_COSINE, tuple(ids)))
            if spec.shots > 1:
                extras.append((q, GEN_COSINE_REVERSED, tuple(ids[::-1])))
    if spec.random:
        for q, pool in lists:
            for seq in random_sequences(pool, spec.shots, spec.random, spec.seed, q):
                extras.append((q, GEN_RANDOM, seq))
    judged: dict[int, list[tuple[str, Scored]]] = {q: [] for q, _ in lists}
    if extras:
        verdicts = judge.verdicts([q for q, _, _ in extras], [s for _, _, s in extras], pool_map)
        for (q, method, seq), verdict in zip(extras, verdicts, strict=True):
            judged[q].append(
                (method, Scored(seq, verdict, _score(verdict, spec.score, judge, q, seq)))
            )
        if on_round is not None:
            on_round(len(extras))
    return [QueryResult(q, pool, beams[q], judged[q]) for q, pool in lists]


def collect(
    judge: Judge,
    pools: PoolTable,
    emb: Embeddings | None,
    spec: CollectSpec,
    on_round: Callable[[int], None] | None = None,
    chunk: int = CHUNK_QUERIES,
) -> dict[str, Any]:
    """RL data (docs/algorithm.md#rl-data) for every query of ``pools``, in table order:
    ``{"<query id>": {"candidate_pool_ids": [...], "pointer_candidates": [...]}}`` (no
    ``_meta``; the caller adds it)."""
    out: dict[str, Any] = {}
    for start in range(0, len(pools), chunk):
        rows = torch.arange(start, min(start + chunk, len(pools)))
        for result in collect_chunk(judge, pools.select(rows), emb, spec, on_round):
            out[str(result.query)] = result.entry()
        judge.forget()  # memory stays flat in the number of queries
    return out


# ---------------------------------------------------------------- merging parts
def merge_parts(parts: Sequence[tuple[str, Any]]) -> dict[str, Any]:
    """One RL data document from the outputs of several collect runs (``(file name,
    document)`` pairs): their queries, sorted by id, under their common ``_meta``.

    Refused with one line naming the file: a part that is not a collect output, parts
    collected with other settings or judges, a query in two parts, and (for ``--shard``
    parts) a part given twice or missing."""
    if not parts:
        raise LeverError("--merge: name the parts to join (the outputs of collect --shard I/N)")
    common: dict[str, Any] | None = None
    first_name = ""
    shards: dict[int, str] = {}
    counts: set[int] = set()
    owner: dict[int, str] = {}
    queries: dict[int, Any] = {}
    for name, doc in parts:
        meta = doc.get("_meta") if isinstance(doc, Mapping) else None
        if not isinstance(meta, Mapping) or meta.get("source") != SOURCE:
            raise LeverError(
                f"{name}: not an output of lever-train collect (no _meta.source {SOURCE!r})"
            )
        shared = {k: v for k, v in meta.items() if k not in ("shard", "queries")}
        if common is None:
            common, first_name = shared, name
        elif shared != common:
            differ = sorted(k for k in set(shared) | set(common) if shared.get(k) != common.get(k))
            raise LeverError(
                f"{name}: collected with other settings than {first_name} "
                f"(_meta differs in {', '.join(differ)})"
            )
        shard = meta.get("shard")
        if shard is not None:
            i, n = parse_shard(str(shard))
            if i in shards:
                raise LeverError(f"{name}: shard {i}/{n} is also {shards[i]}")
            shards[i] = name
            counts.add(n)
        for key, value in doc.items():
            if key == "_meta":
                continue
            try:
                q = int(key)
            except ValueError:
                continue
            if q in owner:
                raise LeverError(f"{name}: query {q} is also in {owner[q]}")
            owner[q] = name
            queries[q] = value
    if shards:
        if len(counts) > 1 or len(shards) != len(parts):
            raise LeverError(
                "--merge: the parts come from different --shard splits (or some are unsharded)"
            )
        n = counts.pop()
        missing = [i for i in range(n) if i not in shards]
        if missing:
            raise LeverError(f"--merge: shard {missing[0]}/{n} is missing (give all {n} parts)")
    assert common is not None
    out: dict[str, Any] = {"_meta": {**common, "queries": len(queries)}}
    for q in sorted(queries):
        out[str(q)] = queries[q]
    return out


__all__ = [
    "CHUNK_QUERIES",
    "GEN_BEAM",
    "GEN_COSINE",
    "GEN_COSINE_REVERSED",
    "GEN_RANDOM",
    "SCORE_FIELDS",
    "SOURCE",
    "CollectSpec",
    "QueryResult",
    "Scored",
    "beam_search",
    "beam_verdicts",
    "check_pools",
    "collect",
    "collect_chunk",
    "extra_sequences",
    "merge_parts",
    "parse_shard",
    "query_verdicts",
    "random_sequences",
    "shard_rows",
]

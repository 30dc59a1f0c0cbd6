"""Queries with candidate pools only: what a selector meets in use.

:func:`load_pools` reads three formats into a :class:`PoolTable`:

* RL data JSON with or without ``pointer_candidates``: the pool is
  ``candidate_pool_ids``, else the sorted set of global ids its candidates use;
* a plain JSON object ``{"<query id>": [global ids, ...]}``;
* JSON Lines, one query per line: ``{"query_id": 12, "candidate_pool_ids": [...]}``
  (``"pool"`` is accepted for the ids), or ``[12, [ids, ...]]``.

Keys that are not integers (``_meta``) are metadata, as in RL data.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import LeverError
from ..jsonstream import iter_object_members
from .budget import check_table
from .embeddings import Embeddings, first_unlisted, unlisted_error
from .rljson import POINTER_FIELDS, DataOptions, _drop_reason, _int_list, _query_id
from .tables import QueryTable, _pad, gather_cand_emb, length_mask, max_length


@dataclass
class PoolTable:
    """Query ids [Q], padded pools [Q, K] of global ids and their lengths [Q]."""

    query_ids: torch.Tensor
    pool_ids: torch.Tensor
    pool_len: torch.Tensor
    pools_cut: int = 0

    def __len__(self) -> int:
        return int(self.query_ids.shape[0])

    def pool_mask(self) -> torch.Tensor:
        """[Q, K] True for real pool entries."""
        return length_mask(self.pool_ids.shape[1], self.pool_len)

    def select(self, rows: torch.Tensor) -> PoolTable:
        """Rows ``rows``, trimmed to their own largest pool."""
        k = max_length(self.pool_len, rows)
        return PoolTable(self.query_ids[rows], self.pool_ids[rows, :k], self.pool_len[rows])

    @classmethod
    def from_table(cls, table: QueryTable) -> PoolTable:
        """The pools of a :class:`QueryTable` (its logged sequences left out)."""
        return cls(table.query_ids, table.pool_ids, table.pool_len)


@dataclass
class PoolBatch:
    """Model-ready pools of a few queries: ``rows`` [B], ``query_emb`` [B, d],
    ``cand_emb`` [B, K, d], ``pool_mask`` [B, K]."""

    rows: torch.Tensor
    query_ids: torch.Tensor
    pool_ids: torch.Tensor
    query_emb: torch.Tensor
    cand_emb: torch.Tensor
    pool_mask: torch.Tensor

    def to(self, device: torch.device | str) -> PoolBatch:
        """The same batch on ``device``."""
        return PoolBatch(
            self.rows,
            self.query_ids,
            self.pool_ids,
            self.query_emb.to(device),
            self.cand_emb.to(device),
            self.pool_mask.to(device),
        )


def pool_batches(
    pools: PoolTable | QueryTable, emb: Embeddings, batch_size: int
) -> Iterator[PoolBatch]:
    """Batches of ``batch_size`` queries in table order."""
    table = pools if isinstance(pools, PoolTable) else PoolTable.from_table(pools)
    for start in range(0, len(table), batch_size):
        rows = torch.arange(start, min(start + batch_size, len(table)))
        sub = table.select(rows)
        yield PoolBatch(
            rows=rows,
            query_ids=sub.query_ids,
            pool_ids=sub.pool_ids,
            query_emb=emb.query.index_select(0, sub.query_ids),
            cand_emb=gather_cand_emb(emb, sub.pool_ids),
            pool_mask=sub.pool_mask(),
        )


def _candidate_ids(cand: Mapping[str, Any], where: str) -> list[int]:
    for name in ("pointer_global", "pointer_pos", "pointer"):
        if name in cand:
            return _int_list(cand[name], where, name)
    raise LeverError(f"{where}: no pointer field (expected one of {', '.join(POINTER_FIELDS)})")


def _pool_of(qid: int, value: Any, where: str) -> list[int]:
    """A query's pool from its JSON value (a list of ids or an RL data query object)."""
    if isinstance(value, list):
        return _int_list(value, where, "pool")
    if not isinstance(value, Mapping):
        raise LeverError(
            f"{where}: expected a list of pool ids or an object with 'candidate_pool_ids', "
            f"found {type(value).__name__}"
        )
    if value.get("candidate_pool_ids") is not None:
        return _int_list(value["candidate_pool_ids"], where, "candidate_pool_ids")
    if value.get("pool") is not None:
        return _int_list(value["pool"], where, "pool")
    cands = value.get("pointer_candidates")
    if not isinstance(cands, list) or not cands:
        raise LeverError(
            f"{where}: no 'candidate_pool_ids' and no 'pointer_candidates' to take a pool from"
        )
    ids: set[int] = set()
    for j, cand in enumerate(cands):
        if not isinstance(cand, Mapping):
            raise LeverError(f"{where} candidate {j}: expected an object")
        if _drop_reason(cand, DataOptions()) is None:
            ids.update(_candidate_ids(cand, f"{where} candidate {j}"))
    if not ids:
        raise LeverError(f"{where}: no candidate left to take a pool from")
    return sorted(ids)


def _jsonl_members(path: Path) -> Iterator[tuple[str, Any]]:
    with open(path, "rb") as fh:
        for n, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise LeverError(f"{path}: line {n} is not UTF-8 text") from None
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except RecursionError:
                raise LeverError(f"{path}: line {n} is JSON nested too deeply") from None
            except json.JSONDecodeError as exc:
                raise LeverError(f"{path}: line {n} is not valid JSON ({exc.msg})") from None
            if isinstance(item, list) and len(item) == 2:
                qid, pool = item
            elif isinstance(item, Mapping) and "query_id" in item:
                qid, pool = item["query_id"], item
            else:
                raise LeverError(
                    f'{path}: line {n}: expected {{"query_id": ..., "candidate_pool_ids": '
                    "[...]}} or [query id, [pool ids]]"
                )
            if isinstance(qid, bool) or not isinstance(qid, int):
                raise LeverError(f"{path}: line {n}: query id {qid!r} is not an integer")
            yield str(qid), pool


def _members(path: Path) -> Iterator[tuple[str, Any]]:
    """The file's ``(key, value)`` members; a file that cannot be read is one line."""
    try:
        if path.suffix.lower() in (".jsonl", ".ndjson"):
            yield from _jsonl_members(path)
        else:
            yield from iter_object_members(path)
    except OSError as exc:
        raise LeverError(f"{path}: cannot read ({exc.strerror or exc})") from None


def _table(qids: list[int], pools: list[list[int]], cut: int) -> PoolTable:
    lengths = torch.tensor([len(x) for x in pools], dtype=torch.long)
    flat = torch.tensor([g for x in pools for g in x], dtype=torch.long)
    return PoolTable(torch.tensor(qids, dtype=torch.long), _pad(flat, lengths), lengths, cut)


def iter_pools(
    path: str | os.PathLike[str], max_pool: int | None = None, chunk: int = 1024
) -> Iterator[PoolTable]:
    """The queries of a query file in file order, ``chunk`` at a time, as
    :class:`PoolTable` pieces: memory holds one piece (and one bit per query id seen),
    whatever the file's size. Each piece's ``pools_cut`` counts its own cut pools. Errors
    (a query twice, a malformed pool, no query at all) are :class:`LeverError` naming the
    file and the query; they may come after earlier pieces were yielded. ``max_pool``
    cuts each pool to its first ids (None: whole)."""
    p = Path(path)
    if not p.is_file():
        raise LeverError(f"{p}: file not found")
    qids: list[int] = []
    pools: list[list[int]] = []
    seen = bytearray()  # one bit per query id below 2**27: a query twice is an error
    seen_large: set[int] = set()  # the (rare) larger ids
    cut = 0
    total = 0
    for key, value in _members(p):
        qid = _query_id(key)
        if qid is None:
            if key.strip().lstrip("+-")[:1].isdigit():
                raise LeverError(f"{p}: key {key!r} looks like a query id but is not an integer")
            continue
        where = f"{p}: query {qid}"
        if qid < 1 << 27:
            byte, bit = divmod(qid, 8)
            if byte >= len(seen):
                seen.extend(bytes(byte + 1 - len(seen)))
            twice = bool(seen[byte] >> bit & 1)
            seen[byte] |= 1 << bit
        else:
            twice = qid in seen_large
            seen_large.add(qid)
        if twice:
            raise LeverError(f"{where}: appears twice")
        pool = _pool_of(qid, value, where)
        if len(set(pool)) != len(pool):
            raise LeverError(f"{where}: the pool holds duplicate ids")
        if max_pool is not None and len(pool) > max_pool:
            pool, cut = pool[:max_pool], cut + 1
        qids.append(qid)
        pools.append(pool)
        total += 1
        if len(qids) >= chunk:
            yield _table(qids, pools, cut)
            qids, pools, cut = [], [], 0
    if qids:
        yield _table(qids, pools, cut)
    if not total:
        raise LeverError(f'{p}: no query found (expected integer keys such as "123")')


def load_pools(path: str | os.PathLike[str], max_pool: int | None = None) -> PoolTable:
    """Read a query file (see the module docstring) into one :class:`PoolTable`, sorted by
    query id, each pool cut to its first ``max_pool`` ids (None: kept whole, within the
    memory guard of :mod:`lever_trainer.data.budget`)."""
    pieces = list(iter_pools(path, max_pool, chunk=1 << 16))
    width = max(piece.pool_ids.shape[1] for piece in pieces)
    check_table(sum(len(piece) for piece in pieces), width, str(path))
    cut = sum(piece.pools_cut for piece in pieces)
    table = PoolTable(
        torch.cat([piece.query_ids for piece in pieces]),
        torch.cat(
            [
                torch.nn.functional.pad(piece.pool_ids, (0, width - piece.pool_ids.shape[1]))
                for piece in pieces
            ]
        ),
        torch.cat([piece.pool_len for piece in pieces]),
        cut,
    )
    out = table.select(torch.argsort(table.query_ids, stable=True))
    out.pools_cut = cut
    return out


def check_pool_ids(pools: PoolTable, emb: Embeddings, path: str) -> None:
    """Every query id and pool id must index a row of its embedding table."""
    n_q, n_c = emb.query.shape[0], emb.cand.shape[0]
    bad_q = (pools.query_ids >= n_q).nonzero()
    if len(bad_q):
        q = int(pools.query_ids[bad_q[0, 0]])
        raise LeverError(
            f"{path}: query {q} has no row in {emb.query_path} ({n_q} rows, ids 0..{n_q - 1})"
        )
    outside = (pools.pool_ids >= n_c) & pools.pool_mask()
    if bool(outside.any()):
        row, col = (int(v) for v in outside.nonzero()[0])
        raise LeverError(
            f"{path}: query {int(pools.query_ids[row])}'s pool names id "
            f"{int(pools.pool_ids[row, col])}, outside {emb.cand_path} ({n_c} rows)"
        )
    query = first_unlisted(emb.query_items, pools.query_ids)
    if query is not None:
        assert emb.query_items is not None
        raise unlisted_error(emb.query_path, emb.query_items, f"query id {query} (of {path})")
    cand = first_unlisted(emb.cand_items, pools.pool_ids[pools.pool_mask()])
    if cand is not None:
        assert emb.cand_items is not None
        raise unlisted_error(emb.cand_path, emb.cand_items, f"candidate id {cand} (of {path})")


__all__ = [
    "PoolBatch",
    "PoolTable",
    "check_pool_ids",
    "iter_pools",
    "load_pools",
    "pool_batches",
]

"""Parsing RL data (docs/algorithm.md): filters, pools, pointer encodings, rewards, into a table.

Members of the top-level JSON object arrive one at a time (from
:mod:`lever_trainer.jsonstream` or a plugin's reader) and are packed into flat typed
arrays, then padded into a :class:`~lever_trainer.data.tables.QueryTable`.
"""

from __future__ import annotations

import math
import os
from array import array
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import LeverError, PluginError
from ..rewards import NormalizeFn, RawRewardFn, RewardParams, RewardRegistry, clip_reward
from .budget import check_table
from .tables import QueryTable, _pad

POINTER_FIELDS = ("pointer_global", "pointer_pos", "pointer")


@dataclass(frozen=True)
class DataOptions:
    """How RL data is filtered, split and scored."""

    #: Cut each pool to its first ``max_pool`` ids; None keeps every pool whole.
    max_pool: int | None = None
    keep_fallback: bool = False
    gen_methods: frozenset[str] | None = None
    require_positive: bool = False
    val_ratio: float = 0.2
    reward_mode: str = "hard_plus_soft"
    reward_params: RewardParams = field(default_factory=RewardParams)
    normalize: str = "z_score_clamp"


@dataclass
class LoadReport:
    """What the loader kept and dropped, printed once at load."""

    path: str
    queries_total: int = 0
    candidates_total: int = 0
    dropped: Counter[str] = field(default_factory=Counter)
    queries_dropped: Counter[str] = field(default_factory=Counter)
    equal_reward_groups: int = 0
    pools_cut: int = 0
    source_sha256: str = ""
    cache: str = ""
    #: Where the prepared form was looked for (and written, when ``cache`` says so).
    cache_path: str = ""

    def lines(self) -> list[str]:
        """Human-readable summary lines."""
        out = [
            f"loaded {self.path}: {self.queries_total} queries, {self.candidates_total} candidates"
        ]
        for reason, n in sorted(self.dropped.items()):
            out.append(f"  dropped {n} candidates: {reason}")
        for reason, n in sorted(self.queries_dropped.items()):
            out.append(f"  dropped {n} queries: {reason}")
        if self.pools_cut:
            out.append(f"  {self.pools_cut} pools cut to --max-pool")
        if self.cache:
            out.append(f"  prepared cache: {self.cache}")
        if self.equal_reward_groups:
            out.append(
                f"  {self.equal_reward_groups} queries have all-equal rewards "
                "(they teach RCE nothing)"
            )
        return out


_MAX_ID = 2**63 - 1


def _int_list(value: Any, where: str, field_name: str) -> list[int]:
    if not isinstance(value, list) or not value:
        raise LeverError(f"{where}: field {field_name!r} must be a non-empty list of integers")
    out = []
    for v in value:
        if isinstance(v, bool) or not isinstance(v, int):
            raise LeverError(f"{where}: field {field_name!r} holds {v!r}, expected an integer")
        if v < 0:
            raise LeverError(f"{where}: field {field_name!r} holds negative value {v}")
        if v > _MAX_ID:  # would overflow the int64 tensors built from it
            raise LeverError(f"{where}: field {field_name!r} holds {v}, too large for an id")
        out.append(v)
    return out


def _drop_reason(cand: Mapping[str, Any], opts: DataOptions) -> str | None:
    if cand.get("eval_failed") is True:
        return "eval_failed"
    mode = cand.get("vqa_eval_mode")
    if mode == "error":
        return "vqa_eval_mode=error"
    if mode == "fallback" and not opts.keep_fallback:
        return "vqa_eval_mode=fallback"
    method = cand.get("gen_method")
    # a non-string gen_method (a list, say) is not in the set; `in` would raise on it
    if opts.gen_methods is not None and (
        not isinstance(method, str) or method not in opts.gen_methods
    ):
        return "gen_method not in --gen-methods"
    return None


@dataclass
class _Group:
    qid: int
    pool: list[int]
    sequences: list[list[int]]
    rewards_raw: list[float]
    correct: list[float]
    cand_index: list[int]


def _query_fields(value: Any, where_q: str) -> tuple[list[Any], list[int] | None]:
    """A query's ``pointer_candidates`` list and its ``candidate_pool_ids`` (None when
    absent), checked: an object, a list of candidates, distinct non-negative pool ids."""
    if not isinstance(value, Mapping):
        raise LeverError(f"{where_q}: expected an object, found {type(value).__name__}")
    cands = value.get("pointer_candidates")
    if not isinstance(cands, list):
        raise LeverError(f"{where_q}: field 'pointer_candidates' must be a list")
    pool_ids = value.get("candidate_pool_ids")
    if pool_ids is not None:
        pool_ids = _int_list(pool_ids, where_q, "candidate_pool_ids")
        if len(set(pool_ids)) != len(pool_ids):
            raise LeverError(f"{where_q}: field 'candidate_pool_ids' holds duplicate ids")
    return cands, pool_ids


def _kept_candidates(
    cands: list[Any], where_q: str, opts: DataOptions, report: LoadReport
) -> list[tuple[int, Mapping[str, Any]]] | None:
    """The ``(index, candidate)`` pairs that pass the filters (:func:`_drop_reason`), each
    drop counted in ``report``; None, the query counted as dropped, when none is left or
    ``--require-positive-query`` finds no correct one."""
    kept: list[tuple[int, Mapping[str, Any]]] = []
    for j, cand in enumerate(cands):
        if not isinstance(cand, Mapping):
            raise LeverError(f"{where_q} candidate {j}: expected an object")
        reason = _drop_reason(cand, opts)
        if reason is not None:
            report.dropped[reason] += 1
            continue
        kept.append((j, cand))
    if not kept:
        report.queries_dropped["no candidate left after filters"] += 1
        return None
    if opts.require_positive and not any(
        _num(c, "vqa_correct", f"{where_q} candidate {j}") == 1 for j, c in kept
    ):
        report.queries_dropped["no correct candidate (--require-positive-query)"] += 1
        return None
    return kept


def _pointer_sequences(
    kept: list[tuple[int, Mapping[str, Any]]], pool_ids: list[int] | None, where_q: str
) -> list[tuple[str, list[int]]]:
    """Each kept candidate's sequence as written: ``("pos", positions)`` in
    ``candidate_pool_ids``, or ``("gid", global ids)``; which pointer field is read
    depends on the fields present (``pointer`` with ``pointer_global`` and pool ids is
    a list of positions)."""
    parsed: list[tuple[str, list[int]]] = []
    for j, cand in kept:
        where = f"{where_q} candidate {j}"
        if "pointer_global" in cand and pool_ids is not None:
            if "pointer" in cand:
                pos = _int_list(cand["pointer"], where, "pointer")
                for p in pos:
                    if p >= len(pool_ids):
                        raise LeverError(
                            f"{where}: pointer position {p} is outside the pool "
                            f"of {len(pool_ids)} candidate_pool_ids"
                        )
                parsed.append(("pos", pos))
            else:
                parsed.append(("gid", _int_list(cand["pointer_global"], where, "pointer_global")))
        elif "pointer_pos" in cand:
            parsed.append(("gid", _int_list(cand["pointer_pos"], where, "pointer_pos")))
        elif "pointer_global" in cand:
            # no candidate_pool_ids to place `pointer` in: the global ids are the sequence
            parsed.append(("gid", _int_list(cand["pointer_global"], where, "pointer_global")))
        elif "pointer" in cand:
            parsed.append(("gid", _int_list(cand["pointer"], where, "pointer")))
        else:
            raise LeverError(
                f"{where}: no pointer field (expected one of {', '.join(POINTER_FIELDS)})"
            )
    return parsed


def _query_pool(
    kept: list[tuple[int, Mapping[str, Any]]],
    parsed: list[tuple[str, list[int]]],
    pool_ids: list[int] | None,
    opts: DataOptions,
    report: LoadReport,
) -> list[int]:
    """The query's pool of global ids: its ``candidate_pool_ids`` when a candidate uses
    ``pointer_global``, else the sorted ids its sequences name; cut to ``--max-pool``
    (counted in ``report``)."""
    if pool_ids is not None and any("pointer_global" in c for _, c in kept):
        pool = list(pool_ids)
    else:
        pool = sorted({g for kind, seq in parsed for g in seq if kind == "gid"})
    if opts.max_pool is not None and len(pool) > opts.max_pool:
        pool = pool[: opts.max_pool]
        report.pools_cut += 1
    return pool


def _pool_positions(
    kept: list[tuple[int, Mapping[str, Any]]],
    parsed: list[tuple[str, list[int]]],
    pool: list[int],
    max_pool: int | None,
    where_q: str,
) -> list[list[int]]:
    """Each sequence as positions in ``pool``; an id outside it, a position past its end
    or a repeated candidate is an error naming the candidate."""
    cap = "" if max_pool is None else f" (--max-pool {max_pool})"
    index = {g: i for i, g in enumerate(pool)}
    sequences: list[list[int]] = []
    for (j, _), (kind, seq) in zip(kept, parsed, strict=True):
        where = f"{where_q} candidate {j}"
        if kind == "pos":
            positions = seq
        else:
            try:
                positions = [index[g] for g in seq]
            except KeyError as exc:
                raise LeverError(
                    f"{where}: candidate id {exc.args[0]} is not in the query's pool"
                    f" of {len(pool)} ids{cap}"
                ) from None
        bad = [p for p in positions if p >= len(pool)]
        if bad:
            raise LeverError(
                f"{where}: pointer position {bad[0]} is outside the pool of {len(pool)} ids{cap}"
            )
        if len(set(positions)) != len(positions):
            raise LeverError(f"{where}: sequence {seq} repeats a candidate")
        sequences.append(positions)
    return sequences


def _candidate_scores(
    kept: list[tuple[int, Mapping[str, Any]]],
    raw_fn: RawRewardFn,
    opts: DataOptions,
    where_q: str,
    mode_label: str,
) -> tuple[list[float], list[float]]:
    """The clipped raw reward and the 0/1 ``vqa_correct`` of each kept candidate, after
    checking that its score fields are numbers."""
    rewards = []
    correct = []
    for j, cand in kept:
        where = f"{where_q} candidate {j}"
        for name in (
            "vqa_acc_score",
            "vqa_gt_prob",
            "vqa_rel_score",
            "beam_score",
            "logprob_score",
        ):
            _num(cand, name, where)
        hard = _num(cand, "vqa_correct", where)
        if hard not in (0.0, 1.0):
            raise LeverError(
                f"{where}: field 'vqa_correct' is {cand.get('vqa_correct')!r}, expected 0 or 1"
            )
        rewards.append(clip_reward(_raw_reward(cand, raw_fn, opts, where, mode_label)))
        correct.append(hard)
    return rewards, correct


def _parse_query(
    qid: int,
    value: Any,
    path: Path,
    opts: DataOptions,
    report: LoadReport,
    raw_fn: RawRewardFn,
    mode_label: str = "",
) -> _Group | None:
    """One query of RL data as a group (pool, sequences as pool positions, clipped raw
    rewards, correctness); None when the filters leave nothing of it (``report`` counts
    what was dropped)."""
    where_q = f"{path}: query {qid}"
    cands, pool_ids = _query_fields(value, where_q)
    kept = _kept_candidates(cands, where_q, opts, report)
    if kept is None:
        return None
    parsed = _pointer_sequences(kept, pool_ids, where_q)
    pool = _query_pool(kept, parsed, pool_ids, opts, report)
    sequences = _pool_positions(kept, parsed, pool, opts.max_pool, where_q)
    rewards, correct = _candidate_scores(kept, raw_fn, opts, where_q, mode_label)
    return _Group(qid, pool, sequences, rewards, correct, [j for j, _ in kept])


def _raw_reward(
    cand: Mapping[str, Any], raw_fn: RawRewardFn, opts: DataOptions, where: str, label: str = ""
) -> float:
    """A candidate's raw reward: its own ``raw_reward`` field when a reader set one
    (the legacy beam format carries its rewards), else the chosen mode's formula.

    ``label`` names the mode and its plugin in messages."""
    if "raw_reward" in cand:
        return _num(cand, "raw_reward", where)
    label = label or f"reward mode {opts.reward_mode!r}"
    try:
        answer = raw_fn(cand, opts.reward_params)
    except LeverError:
        raise
    except Exception as exc:
        raise PluginError(f"{where}: {label} failed: {type(exc).__name__}: {exc}") from exc
    if isinstance(answer, bool) or not isinstance(answer, int | float):
        # a 0-d tensor or numpy scalar is a number too; anything else is a plugin bug
        item = getattr(answer, "item", None)
        shape = getattr(answer, "shape", None)
        if not callable(item) or shape not in ((), None) or getattr(answer, "ndim", 0) != 0:
            raise PluginError(
                f"{where}: {label} returned {type(answer).__name__} {answer!r:.60}, "
                "expected a number"
            )
        answer = item()
        if isinstance(answer, bool) or not isinstance(answer, int | float):
            raise PluginError(
                f"{where}: {label} returned {type(answer).__name__}, expected a number"
            )
    value = float(answer)
    if not math.isfinite(value):
        raise LeverError(f"{where}: {label} gave {value}")
    return value


def _num(cand: Mapping[str, Any], name: str, where: str) -> float:
    value = cand.get(name)
    if value is None:
        return 0.0
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise LeverError(f"{where}: field {name!r} must be a number, got {value!r}")
    try:
        number = float(value)
    except OverflowError:  # an int beyond float range, e.g. 10**400
        raise LeverError(
            f"{where}: field {name!r} is too large, expected a finite number"
        ) from None
    if not math.isfinite(number):
        raise LeverError(f"{where}: field {name!r} is {value}, expected a finite number")
    return number


def _query_id(key: str) -> int | None:
    try:
        qid = int(key, 10)
    except ValueError:
        return None
    return qid if qid >= 0 and str(qid) == key.strip() else None


class _GroupBuffer:
    """Parsed query groups kept in flat typed arrays: 8 bytes a number, not Python objects.

    A 100,000-query file holds millions of ids and rewards; Python lists of ints and
    floats would cost several times the file size.
    """

    def __init__(self) -> None:
        self.qids = array("q")
        self.pool_len = array("q")
        self.group_len = array("q")
        self.pool = array("q")
        self.seqs = array("q")
        self.raw = array("d")
        self.correct = array("d")
        self.cand_index = array("q")
        self.seq_len: int | None = None

    def __len__(self) -> int:
        return len(self.qids)

    def add(self, g: _Group, where: str) -> None:
        """Append one group; every sequence must have the file's length S."""
        for j, seq in zip(g.cand_index, g.sequences, strict=True):
            if self.seq_len is None:
                self.seq_len = len(seq)
            elif len(seq) != self.seq_len:
                raise LeverError(
                    f"{where}: query {g.qid} candidate {j}: sequence has length {len(seq)}"
                    f" but earlier sequences have length {self.seq_len}"
                )
        self.qids.append(g.qid)
        self.pool_len.append(len(g.pool))
        self.group_len.append(len(g.sequences))
        self.pool.extend(g.pool)
        for seq in g.sequences:
            self.seqs.extend(seq)
        self.raw.extend(g.rewards_raw)
        self.correct.extend(g.correct)
        self.cand_index.extend(g.cand_index)

    def to_table(
        self, normalize: NormalizeFn, params: RewardParams, label: str = "the normaliser"
    ) -> QueryTable:
        """Pad into a :class:`QueryTable` in query-id order, normalising each group.

        ``label`` names the normaliser and its plugin in messages: each group's answer
        must be a finite float tensor with one value per candidate (never broadcast)."""
        s = self.seq_len or 0
        pool_len = torch.tensor(self.pool_len, dtype=torch.long)
        group_len = torch.tensor(self.group_len, dtype=torch.long)
        seqs = torch.tensor(self.seqs, dtype=torch.long).view(-1, s)
        raw = _pad(torch.tensor(self.raw, dtype=torch.float32), group_len)
        table = QueryTable(
            query_ids=torch.tensor(self.qids, dtype=torch.long),
            pool_ids=_pad(torch.tensor(self.pool, dtype=torch.long), pool_len),
            pool_len=pool_len,
            sequences=_pad(seqs, group_len),
            group_len=group_len,
            rewards_raw=raw,
            rewards_norm=torch.zeros_like(raw),
            correct=_pad(torch.tensor(self.correct, dtype=torch.float32), group_len),
            cand_index=_pad(torch.tensor(self.cand_index, dtype=torch.long), group_len),
        )
        table = table.select(torch.argsort(table.query_ids))
        norm = torch.zeros_like(table.rewards_raw)
        for i, n in enumerate(table.group_len.tolist()):
            qid = int(table.query_ids[i])
            raw = table.rewards_raw[i, :n].clone()
            norm[i, :n] = _normalized(normalize, raw, params, label, qid)
        table.rewards_norm = norm
        return table


def _normalized(
    normalize: NormalizeFn, rewards: torch.Tensor, params: RewardParams, label: str, qid: int
) -> torch.Tensor:
    """One group's normalised rewards, checked: a tensor of the group's shape, finite."""
    n = rewards.numel()
    try:
        out = normalize(rewards, params)
    except LeverError:
        raise
    except Exception as exc:
        raise PluginError(f"{label} failed on query {qid}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(out, torch.Tensor):
        raise PluginError(
            f"{label} returned {type(out).__name__} for query {qid}, expected a tensor of "
            f"shape [{n}]"
        )
    if tuple(out.shape) != (n,) or not (out.is_floating_point() or out.dtype == torch.long):
        raise PluginError(
            f"{label} returned a tensor of shape {list(out.shape)} {out.dtype} for query {qid}'s "
            f"{n} rewards, expected one float per candidate (shape [{n}])"
        )
    if not bool(torch.isfinite(out).all()):
        raise PluginError(f"{label} returned non-finite values for query {qid}: {out.tolist()}")
    return out.to(torch.float32)


def build_table(
    groups: Sequence[_Group], normalize: NormalizeFn, params: RewardParams, where: str = "data"
) -> QueryTable:
    """Pad parsed groups into a :class:`QueryTable` and normalise each group's rewards."""
    buf = _GroupBuffer()
    for g in groups:
        buf.add(g, where)
    return buf.to_table(normalize, params)


def parse_rl_members(
    members: Iterable[tuple[str, Any]],
    path: str | os.PathLike[str],
    opts: DataOptions,
    registry: RewardRegistry,
) -> tuple[QueryTable, LoadReport]:
    """Turn ``(key, value)`` members of an RL data object into a table and a load report.

    ``registry`` supplies the reward mode and normaliser named in ``opts``.
    """
    p = Path(path)
    raw_fn = registry.raw_fn(opts.reward_mode)
    normalize = registry.normalize_fn(opts.normalize)
    mode_plugin = registry.providers.get(f"mode:{opts.reward_mode}")
    norm_plugin = registry.providers.get(f"normalizer:{opts.normalize}")
    mode_label = f"reward mode {opts.reward_mode!r}" + (
        f" (plugin {mode_plugin})" if mode_plugin else ""
    )
    norm_label = f"normaliser {opts.normalize!r}" + (
        f" (plugin {norm_plugin})" if norm_plugin else ""
    )
    report = LoadReport(str(p))
    buf = _GroupBuffer()
    seen: dict[int, str] = {}
    for key, value in members:
        qid = _query_id(key)
        if qid is None:
            stripped = key.strip().lstrip("+-")
            if stripped[:1].isdigit():
                raise LeverError(f"{p}: key {key!r} looks like a query id but is not an integer")
            continue  # metadata such as "_meta"
        if qid > _MAX_ID:
            raise LeverError(f"{p}: query id {key} is too large")
        if qid in seen:  # "7" and " 7" both parse as 7
            raise LeverError(f"{p}: query id {qid} appears twice (keys {seen[qid]!r}, {key!r})")
        seen[qid] = key
        group = _parse_query(qid, value, p, opts, report, raw_fn, mode_label)
        if group is not None:
            buf.add(group, str(p))
    if not seen:
        raise LeverError(f'{p}: no query found (expected integer keys such as "123")')
    if not len(buf):
        raise LeverError(f"{p}: no query has a candidate left after filtering")
    check_table(len(buf), max(buf.pool_len), str(p))
    table = buf.to_table(normalize, opts.reward_params, norm_label)
    report.queries_total = len(table)
    report.candidates_total = table.num_candidates
    mask = table.cand_mask()
    high = table.rewards_raw.masked_fill(~mask, float("-inf")).amax(1)
    low = table.rewards_raw.masked_fill(~mask, float("inf")).amin(1)
    report.equal_reward_groups = int((high - low <= 1e-12).sum())
    return table, report

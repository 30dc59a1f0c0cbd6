"""Reading and validating input files, and turning them into padded batches.

The RL data JSON (SPEC 2.1) becomes a :class:`QueryTable`: one row per query, every
per-candidate field a padded tensor with explicit lengths, built once at load. A
:class:`Batch` is a slice of that table plus the embeddings it points at, with
masks for padded pool entries and padded candidates (ARCHITECTURE rule 9).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from array import array
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from .errors import LeverError, PluginError
from .jsonstream import iter_object_members
from .rewards import (
    NormalizeFn,
    RawRewardFn,
    RewardParams,
    RewardRegistry,
    clip_reward,
    default_registry,
)

POINTER_FIELDS = ("pointer_global", "pointer_pos", "pointer")


# --------------------------------------------------------------------------- options
@dataclass(frozen=True)
class DataOptions:
    """How RL data is filtered, split and scored."""

    max_pool: int = 64
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


# --------------------------------------------------------------------------- table
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
        k = int(self.pool_len[rows].max()) if len(rows) else 0
        g = int(self.group_len[rows].max()) if len(rows) else 0
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
        k = self.pool_ids.shape[1]
        return torch.arange(k).unsqueeze(0) < self.pool_len.unsqueeze(1)

    def cand_mask(self) -> torch.Tensor:
        """[Q, G] True for real candidate sequences."""
        g = self.sequences.shape[1]
        return torch.arange(g).unsqueeze(0) < self.group_len.unsqueeze(1)


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


# --------------------------------------------------------------------------- embeddings
@dataclass
class Embeddings:
    """Query and candidate embedding tables, each [N, d] float32, indexed by global id."""

    query: torch.Tensor
    cand: torch.Tensor
    query_path: str
    cand_path: str

    @property
    def dim(self) -> int:
        """Embedding width d."""
        return int(self.query.shape[1])


def _numpy_safe_globals() -> list[Any]:
    """Globals a ``torch.save``-d numpy array needs under ``weights_only=True``."""
    import numpy as np

    core = getattr(np, "_core", None) or np.core
    allowed: list[Any] = [core.multiarray._reconstruct, np.ndarray, np.dtype]
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        allowed += [getattr(dtypes, n) for n in dir(dtypes) if n.endswith("DType")]
    return allowed


def _as_tensor(obj: Any, path: str, key: str | None) -> torch.Tensor:
    if isinstance(obj, Mapping):
        tensors = {k: v for k, v in obj.items() if hasattr(v, "shape")}
        if key is not None:
            if key not in tensors:
                raise LeverError(
                    f"{path}: no tensor named {key!r} (has: {', '.join(map(str, tensors))})"
                )
            obj = tensors[key]
        elif len(tensors) == 1:
            obj = next(iter(tensors.values()))
        else:
            raise LeverError(
                f"{path}: holds {len(tensors)} tensors ({', '.join(map(str, tensors))}); "
                "name one with --emb-key"
            )
    if isinstance(obj, torch.Tensor):
        return obj
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy is a declared dependency
        raise LeverError(f"{path}: reading numpy arrays needs numpy installed") from None
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind not in "fiub":
            raise LeverError(f"{path}: array dtype {obj.dtype} is not numeric")
        return torch.from_numpy(np.ascontiguousarray(obj))
    raise LeverError(f"{path}: expected a 2-D tensor or array, found {type(obj).__name__}")


def read_tensor_file(path: str | os.PathLike[str], key: str | None = None) -> torch.Tensor:
    """Read one tensor from ``.pt``/``.pth`` (weights_only), ``.npy`` or ``.safetensors``."""
    p = Path(path)
    if not p.is_file():
        raise LeverError(f"{p}: file not found")
    suffix = p.suffix.lower()
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            return _as_tensor(load_file(str(p)), str(p), key)
        if suffix == ".npy":
            import numpy as np

            return _as_tensor(np.load(p, allow_pickle=False), str(p), key)
        if suffix in (".pt", ".pth", ".bin"):
            with torch.serialization.safe_globals(_numpy_safe_globals()):
                obj = torch.load(p, map_location="cpu", weights_only=True)
            return _as_tensor(obj, str(p), key)
    except LeverError:
        raise
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LeverError(f"{p}: cannot read as {suffix} tensor file ({reason})") from None
    raise LeverError(
        f"{p}: unsupported embedding format {suffix!r} (expected .pt, .pth, .npy or .safetensors)"
    )


def load_embedding_table(path: str | os.PathLike[str], key: str | None = None) -> torch.Tensor:
    """Read and validate an embedding table: 2-D, floating point, finite; returns float32."""
    t = read_tensor_file(path, key)
    if t.dim() != 2:
        raise LeverError(
            f"{path}: embeddings must be a 2-D [N, d] tensor, got shape {list(t.shape)}"
        )
    if not t.is_floating_point():
        raise LeverError(f"{path}: embeddings must be floating point, got {t.dtype}")
    t = t.to(torch.float32)
    if not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).any(dim=1).nonzero()[0, 0])
        raise LeverError(f"{path}: embeddings contain non-finite values (first in row {bad})")
    return t.contiguous()


def load_embeddings(
    path: str | os.PathLike[str],
    cand_path: str | os.PathLike[str] | None = None,
    key: str | None = None,
) -> Embeddings:
    """Load the query table and (optionally separate) candidate table."""
    query = load_embedding_table(path, key)
    cand = query if cand_path is None else load_embedding_table(cand_path, key)
    if cand.shape[1] != query.shape[1]:
        raise LeverError(
            f"{cand_path}: candidate embeddings have d={cand.shape[1]} but query embeddings "
            f"({path}) have d={query.shape[1]}"
        )
    return Embeddings(query, cand, str(path), str(cand_path or path))


def check_ids_in_range(table: QueryTable, emb: Embeddings) -> None:
    """Every query id and pool id must index a row of its embedding table."""
    n_q, n_c = emb.query.shape[0], emb.cand.shape[0]
    if len(table) == 0:
        return
    max_q = int(table.query_ids.max())
    if max_q >= n_q:
        raise LeverError(
            f"{emb.query_path}: has {n_q} rows but query id {max_q} needs row {max_q} "
            "(too few rows for the RL data)"
        )
    valid = table.pool_mask()
    max_c = int(table.pool_ids[valid].max()) if bool(valid.any()) else -1
    if max_c >= n_c:
        row = int((table.pool_ids.masked_fill(~valid, -1) == max_c).any(dim=1).nonzero()[0, 0])
        raise LeverError(
            f"{emb.cand_path}: has {n_c} rows but query {int(table.query_ids[row])} "
            f"uses candidate id {max_c} (too few rows for the RL data)"
        )


# --------------------------------------------------------------------------- RL JSON
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


def _parse_query(
    qid: int, value: Any, path: Path, opts: DataOptions, report: LoadReport, raw_fn: RawRewardFn
) -> _Group | None:
    where_q = f"{path}: query {qid}"
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

    # Each candidate's sequence: ("pos", positions in candidate_pool_ids) or ("gid", global ids).
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

    uses_pool = pool_ids is not None and any("pointer_global" in c for _, c in kept)
    if uses_pool:
        assert pool_ids is not None
        pool = list(pool_ids)
    else:
        pool = sorted({g for kind, seq in parsed for g in seq if kind == "gid"})
    if len(pool) > opts.max_pool:
        pool = pool[: opts.max_pool]
        report.pools_cut += 1
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
                    f" of {len(pool)} ids (--max-pool {opts.max_pool})"
                ) from None
        bad = [p for p in positions if p >= len(pool)]
        if bad:
            raise LeverError(
                f"{where}: pointer position {bad[0]} is outside the pool of "
                f"{len(pool)} ids (--max-pool {opts.max_pool})"
            )
        if len(set(positions)) != len(positions):
            raise LeverError(f"{where}: sequence {seq} repeats a candidate")
        sequences.append(positions)

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
        rewards.append(clip_reward(_raw_reward(cand, raw_fn, opts, where)))
        correct.append(hard)
    return _Group(qid, pool, sequences, rewards, correct, [j for j, _ in kept])


def _raw_reward(
    cand: Mapping[str, Any], raw_fn: RawRewardFn, opts: DataOptions, where: str
) -> float:
    """A candidate's raw reward: its own ``raw_reward`` field when a reader set one
    (the legacy beam format carries its rewards), else the chosen mode's formula."""
    if "raw_reward" in cand:
        return _num(cand, "raw_reward", where)
    try:
        value = float(raw_fn(cand, opts.reward_params))
    except LeverError:
        raise
    except Exception as exc:
        raise PluginError(
            f"{where}: reward mode {opts.reward_mode!r} failed: {type(exc).__name__}: {exc}"
        ) from exc
    if not math.isfinite(value):
        raise LeverError(f"{where}: reward mode {opts.reward_mode!r} gave {value}")
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

    def to_table(self, normalize: NormalizeFn, params: RewardParams) -> QueryTable:
        """Pad into a :class:`QueryTable` in query-id order, normalising each group."""
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
            norm[i, :n] = normalize(table.rewards_raw[i, :n], params)
        table.rewards_norm = norm
        return table


def _pad(flat: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Rows of ``flat`` (concatenated segments of ``lengths``) as a zero-padded [Q, max] tensor."""
    width = int(lengths.max()) if len(lengths) else 0
    rows = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
    starts = torch.cumsum(lengths, 0) - lengths
    cols = torch.arange(len(rows)) - starts[rows]
    out = torch.zeros((len(lengths), width, *flat.shape[1:]), dtype=flat.dtype)
    out[rows, cols] = flat
    return out


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
    registry: RewardRegistry | None = None,
) -> tuple[QueryTable, LoadReport]:
    """Turn ``(key, value)`` members of an RL data object into a table and a load report.

    ``registry`` supplies the reward mode and normaliser named in ``opts`` (default:
    those of the plugins that are on by default).
    """
    p = Path(path)
    registry = registry if registry is not None else default_registry()
    raw_fn = registry.raw_fn(opts.reward_mode)
    normalize = registry.normalize_fn(opts.normalize)
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
        group = _parse_query(qid, value, p, opts, report, raw_fn)
        if group is not None:
            buf.add(group, str(p))
    if not seen:
        raise LeverError(f'{p}: no query found (expected integer keys such as "123")')
    if not len(buf):
        raise LeverError(f"{p}: no query has a candidate left after filtering")
    table = buf.to_table(normalize, opts.reward_params)
    report.queries_total = len(table)
    report.candidates_total = table.num_candidates
    mask = table.cand_mask()
    high = table.rewards_raw.masked_fill(~mask, float("-inf")).amax(1)
    low = table.rewards_raw.masked_fill(~mask, float("inf")).amin(1)
    report.equal_reward_groups = int((high - low <= 1e-12).sum())
    return table, report


# --------------------------------------------------------------------------- prepared cache
CACHE_SUFFIX = ".lever-cache.safetensors"
CACHE_FORMAT = "1"
TABLE_FIELDS = (
    "query_ids",
    "pool_ids",
    "pool_len",
    "sequences",
    "group_len",
    "rewards_raw",
    "rewards_norm",
    "correct",
    "cand_index",
)


def cache_path_for(path: str | os.PathLike[str]) -> Path:
    """Path of the prepared form of an RL data file: beside it, ``*.lever-cache.safetensors``."""
    return Path(str(path) + CACHE_SUFFIX)


def options_key(opts: DataOptions) -> str:
    """The data options that shape the table, as canonical JSON (val_ratio excluded)."""
    fields_ = {
        "max_pool": opts.max_pool,
        "keep_fallback": opts.keep_fallback,
        "gen_methods": sorted(opts.gen_methods) if opts.gen_methods is not None else None,
        "require_positive": opts.require_positive,
        "reward_mode": opts.reward_mode,
        "reward_params": opts.reward_params.to_dict(),
        "normalize": opts.normalize,
    }
    return json.dumps(fields_, sort_keys=True)


def save_prepared(
    table: QueryTable,
    report: LoadReport,
    source_sha256: str,
    opts: DataOptions,
    out: Path,
    producers: str = "",
) -> None:
    """Write a table and its load report as a safetensors file, atomically."""
    from safetensors.torch import save

    from .checkpoint import atomic_write_bytes

    meta = {
        "cache_format": CACHE_FORMAT,
        "source_sha256": source_sha256,
        "options": options_key(opts),
        "producers": producers,
        "report": json.dumps(
            {
                "path": report.path,
                "queries_total": report.queries_total,
                "candidates_total": report.candidates_total,
                "dropped": dict(report.dropped),
                "queries_dropped": dict(report.queries_dropped),
                "equal_reward_groups": report.equal_reward_groups,
                "pools_cut": report.pools_cut,
            }
        ),
    }
    tensors = {name: getattr(table, name).contiguous() for name in TABLE_FIELDS}
    atomic_write_bytes(out, save(tensors, metadata=meta))


def load_prepared(
    path: Path, source_sha256: str, opts: DataOptions, producers: str = ""
) -> tuple[QueryTable, LoadReport] | None:
    """The cached table if ``path`` was prepared from these bytes with these options, else None."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as fh:
            meta = fh.metadata() or {}
            if (
                meta.get("cache_format") != CACHE_FORMAT
                or meta.get("source_sha256") != source_sha256
                or meta.get("options") != options_key(opts)
                or meta.get("producers", "") != producers
            ):
                return None
            tensors = {name: fh.get_tensor(name) for name in TABLE_FIELDS}
        info = json.loads(meta["report"])
    except Exception:  # an unreadable cache is rebuilt, never trusted
        return None
    report = LoadReport(
        info["path"],
        info["queries_total"],
        info["candidates_total"],
        Counter(info["dropped"]),
        Counter(info["queries_dropped"]),
        info["equal_reward_groups"],
        info["pools_cut"],
    )
    return QueryTable(**tensors), report


def load_rl_data(
    path: str | os.PathLike[str],
    opts: DataOptions,
    cache: bool = False,
    warn: Callable[[str], None] | None = None,
    registry: RewardRegistry | None = None,
    reader: Callable[[Path], Iterable[tuple[str, Any]]] | None = None,
    producers: str = "",
) -> tuple[QueryTable, LoadReport]:
    """Read, filter and validate an RL data file into a :class:`QueryTable`.

    The file is decoded one query at a time, by ``reader`` when given (a plugin's
    reader of another format, yielding members in the RL data format) or as RL data
    JSON. With ``cache``, a prepared form next to the file (:func:`cache_path_for`)
    is used when it was made from the same bytes (sha256) with the same options and
    the same ``producers`` (a caller's description of the code that reads and scores
    the file: which plugins, which versions), and written otherwise.
    """
    p = Path(path)
    if not p.is_file():
        raise LeverError(f"{p}: file not found")
    registry = registry if registry is not None else default_registry()
    # Resolve the names first: an unknown mode is an error even when a cache exists.
    registry.raw_fn(opts.reward_mode)
    registry.normalize_fn(opts.normalize)
    digest = file_fingerprint(p) if cache else ""
    target = cache_path_for(p)
    if cache and target.is_file():
        hit = load_prepared(target, digest, opts, producers)
        if hit is not None:
            hit[1].source_sha256, hit[1].cache = digest, f"read {target}"
            return hit
    members = reader(p) if reader is not None else iter_object_members(p)
    table, report = parse_rl_members(members, p, opts, registry)
    report.source_sha256 = digest
    if cache:
        try:
            save_prepared(table, report, digest, opts, target, producers)
            report.cache = f"wrote {target}"
        except OSError as exc:
            if warn is not None:
                warn(f"warning: cannot write the prepared cache {target} ({exc.strerror or exc})")
    return table, report


def split_train_val(table: QueryTable, val_ratio: float) -> tuple[QueryTable, QueryTable]:
    """Deterministic split: query ids in numeric order, the first (1 - val_ratio) train."""
    if not 0.0 <= val_ratio < 1.0:
        raise LeverError(f"--val-ratio: expected a value in [0, 1), got {val_ratio}")
    order = torch.argsort(table.query_ids, stable=True)
    # the epsilon keeps e.g. 20 * (1 - 0.9) = 1.9999999999999996 from flooring to 1
    n_train = math.floor(len(table) * (1.0 - val_ratio) + 1e-9)
    n_train = max(1, min(len(table), n_train))
    return table.select(order[:n_train]), table.select(order[n_train:])


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
        # index_select is several times faster than advanced indexing for this gather
        cand_emb=emb.cand.index_select(0, sub.pool_ids.reshape(-1)).view(
            *sub.pool_ids.shape, emb.cand.shape[1]
        ),
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


def file_fingerprint(*paths: str | os.PathLike[str] | None) -> str:
    """sha256 over the bytes of the given files (None entries are skipped)."""
    h = hashlib.sha256()
    for path in paths:
        if path is None:
            continue
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


__all__ = [
    "Batch",
    "DataOptions",
    "Embeddings",
    "LoadReport",
    "QueryTable",
    "build_table",
    "cache_path_for",
    "check_ids_in_range",
    "file_fingerprint",
    "iter_batches",
    "load_embeddings",
    "load_rl_data",
    "make_batch",
    "parse_rl_members",
    "split_train_val",
]

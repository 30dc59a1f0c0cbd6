"""The prepared form of an RL data file: its table as safetensors, keyed by the source's
sha256, the data options and the plugins that read and scored it."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

from ..fileio import atomic_write_bytes
from .rljson import DataOptions, LoadReport
from .tables import QueryTable

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


def cache_path_for(
    path: str | os.PathLike[str],
    cache_dir: str | os.PathLike[str] | None = None,
    source_sha256: str = "",
) -> Path:
    """Path of the prepared form of an RL data file.

    Beside the file (``rl.json.lever-cache.safetensors``) by default. In ``cache_dir``
    (``--cache-dir``, for read-only or shared datasets) the name also carries the first
    16 hex digits of the file's sha256 (``rl.json.0123abcd....lever-cache.safetensors``):
    the prepared form of each content has its own file, so files of the same name in
    different directories, or on different machines, share a cache directory safely.
    """
    if cache_dir is None:
        return Path(str(path) + CACHE_SUFFIX)
    return Path(cache_dir) / f"{Path(path).name}.{source_sha256[:16]}{CACHE_SUFFIX}"


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

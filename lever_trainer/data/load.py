"""Loading RL data: the prepared cache when fresh, else the file parsed one query at a time."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from ..errors import LeverError
from ..jsonstream import iter_object_members
from ..rewards import RewardRegistry
from .cache import cache_path_for, load_prepared, save_prepared
from .rljson import DataOptions, LoadReport, parse_rl_members
from .tables import QueryTable


def load_rl_data(
    path: str | os.PathLike[str],
    opts: DataOptions,
    registry: RewardRegistry,
    cache: bool = False,
    warn: Callable[[str], None] | None = None,
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

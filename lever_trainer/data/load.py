"""Loading RL data: the prepared cache when fresh, else the file parsed one query at a time.

The sha256 recorded for a table (in the prepared cache, and in the run's data
fingerprint) is always that of the bytes the table was parsed from: the built-in JSON
reader hashes the bytes as it reads them, and a plugin's reader, which opens the file
itself, is checked like the embedding files (:func:`load_verified`): hashed before, and
found unchanged after (its inode change time, size and modification time did not move,
or it hashes the same again).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from ..errors import LeverError, PluginError
from ..jsonstream import iter_object_members
from ..rewards import RewardRegistry
from .cache import cache_path_for, load_prepared, save_prepared
from .rljson import DataOptions, LoadReport, parse_rl_members
from .tables import QueryTable

T = TypeVar("T")


def load_rl_data(
    path: str | os.PathLike[str],
    opts: DataOptions,
    registry: RewardRegistry,
    cache: bool = False,
    warn: Callable[[str], None] | None = None,
    reader: Callable[[Path], Iterable[tuple[str, Any]]] | None = None,
    producers: str = "",
    cache_dir: str | os.PathLike[str] | None = None,
) -> tuple[QueryTable, LoadReport]:
    """Read, filter and validate an RL data file into a :class:`QueryTable`.

    The file is decoded one query at a time, by ``reader`` when given (a plugin's
    reader of another format, yielding members in the RL data format) or as RL data
    JSON. With ``cache``, a prepared form (:func:`cache_path_for`: beside the file, or in
    ``cache_dir``) is used when it was made from the same bytes (sha256) with the same
    options and the same ``producers`` (a caller's description of the code that reads
    and scores the file: which plugins, which versions), and written otherwise.

    ``report.source_sha256`` is the sha256 of the bytes the table comes from. A file
    rewritten while a plugin's reader reads it is an error; one rewritten between the
    cache lookup and the built-in reader's pass is parsed as it is then, and the cache
    and the report record the bytes that were parsed.
    """
    p = Path(path)
    if not p.is_file():
        raise LeverError(f"{p}: file not found")
    # Resolve the names first: an unknown mode is an error even when a cache exists.
    registry.raw_fn(opts.reward_mode)
    registry.normalize_fn(opts.normalize)
    # The hash before parsing finds the prepared form; skip it when there is none to find.
    lookup = cache and (cache_dir is not None or cache_path_for(p).is_file())
    signature = file_signature(p) if reader is not None else []
    before = file_fingerprint(p) if lookup or reader is not None else ""
    target = cache_path_for(p, cache_dir, before)
    if cache and target.is_file():
        hit = load_prepared(target, before, opts, producers)
        if hit is not None:
            hit[1].source_sha256, hit[1].cache = before, f"read {target}"
            hit[1].cache_path = str(target)
            return hit
    if reader is None:
        table, report, digest = _parse_json(p, opts, registry, before, warn)
        if before and digest != before:
            target = cache_path_for(p, cache_dir, digest)
    else:
        table, report = parse_rl_members(reader(p), p, opts, registry)
        digest = fingerprint_after(signature, before, p)
        if digest != before:
            raise LeverError(
                f"{p}: the file changed while it was being read (its sha256 differs before "
                "and after); run again once it is completely written"
            )
    report.source_sha256 = digest
    report.cache_path = str(target)
    if cache:
        _write_prepared(table, report, opts, target, producers, cache_dir is not None, warn)
    return table, report


def _parse_json(
    p: Path,
    opts: DataOptions,
    registry: RewardRegistry,
    before: str,
    warn: Callable[[str], None] | None,
) -> tuple[QueryTable, LoadReport, str]:
    """Parse RL data JSON with the built-in streaming reader, hashing the bytes as they
    are read; returns the table, its report and that sha256. ``before`` is the file's
    hash from before the read, if one was taken: a file that no longer matches it is
    warned about (the run uses what it parsed)."""
    hasher = hashlib.sha256()
    table, report = parse_rl_members(iter_object_members(p, hasher), p, opts, registry)
    digest = hasher.hexdigest()
    if before and digest != before and warn is not None:
        warn(
            f"warning: {p} changed while it was being read; this run uses the "
            "content it parsed (its sha256 is the one recorded)"
        )
    return table, report, digest


def _write_prepared(
    table: QueryTable,
    report: LoadReport,
    opts: DataOptions,
    target: Path,
    producers: str,
    chosen_dir: bool,
    warn: Callable[[str], None] | None,
) -> None:
    """Write the prepared form of ``table`` to ``target`` and say so in ``report``; a
    failure to write it is a warning (with a hint at ``--cache-dir`` unless the user
    chose the directory, ``chosen_dir``), not an error."""
    try:
        save_prepared(table, report, report.source_sha256, opts, target, producers)
        report.cache = f"wrote {target}"
    except OSError as exc:
        if warn is not None:
            hint = "" if chosen_dir else "; --cache-dir DIR puts it elsewhere"
            warn(f"warning: cannot write the prepared cache {target} ({exc.strerror or exc}){hint}")


def plugin_members(
    members: Any, plugin: str, path: str | os.PathLike[str]
) -> Iterator[tuple[str, Any]]:
    """The members a plugin's ``read_rl_data`` answer yields, checked one by one.

    Each must be a ``(query id, query)`` pair with a string key; anything the plugin
    raises while yielding them becomes a :class:`PluginError` naming the plugin.
    """
    where = f"plugin {plugin}: hook read_rl_data"
    try:
        iterator = iter(members)
    except TypeError:
        raise PluginError(
            f"{where} returned {type(members).__name__}, expected an iterable of "
            "(query id, query) pairs"
        ) from None
    index = 0
    while True:
        try:
            item = next(iterator)
        except StopIteration:
            return
        except LeverError:
            raise
        except Exception as exc:
            raise PluginError(
                f"{where} failed while reading {path} (after {index} members): "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        if not isinstance(item, tuple) or len(item) != 2 or not isinstance(item[0], str):
            raise PluginError(
                f"{where} yielded {type(item).__name__} {item!r:.80} as member {index} of "
                f"{path}, expected a (query id string, query) pair"
            )
        index += 1
        yield item


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


def file_signature(*paths: str | os.PathLike[str] | None) -> list[tuple[int, ...]]:
    """What changes whenever a file is written: inode, size, modification and inode change
    times (the change time is set by the kernel on every write; users cannot set it)."""
    out: list[tuple[int, ...]] = []
    for path in paths:
        if path is None:
            continue
        st = os.stat(path)
        out.append((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
    return out


def fingerprint_after(
    signature: list[tuple[int, ...]], before: str, *paths: str | os.PathLike[str] | None
) -> str:
    """The sha256 of ``paths`` after a read that began with ``signature`` and ``before``
    (:func:`file_signature`, :func:`file_fingerprint`): ``before`` when the signature did
    not move, else the files hashed again."""
    try:
        unchanged = file_signature(*paths) == signature
    except OSError:
        unchanged = False
    return before if unchanged else file_fingerprint(*paths)


def load_verified(load: Callable[[], T], *paths: str | os.PathLike[str] | None) -> tuple[T, str]:
    """``load()``, and the sha256 of ``paths`` (:func:`file_fingerprint`), which must be
    the same before and after the load: the fingerprint is that of the bytes loaded.

    The files are hashed once, before; after the load they are hashed again only when
    their :func:`file_signature` moved (a write, or a ``touch``)."""
    try:
        signature = file_signature(*paths)
        before = file_fingerprint(*paths)
    except OSError as exc:
        load()  # the loader names a missing or unreadable file in its own words
        raise LeverError(f"{exc.filename}: cannot read ({exc.strerror or exc})") from None
    value = load()
    after = fingerprint_after(signature, before, *paths)
    if after != before:
        names = ", ".join(str(p) for p in paths if p is not None)
        raise LeverError(
            f"{names}: changed while being read (the sha256 differs before and after); "
            "run again once the file is completely written"
        )
    return value, after

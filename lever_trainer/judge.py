"""Downstream judges (docs/algorithm.md#judging) and the store that keeps every verdict they give.

An :class:`Environment` is contributed by a plugin through the ``environments`` hook: it
judges ordered demonstration sequences for queries, in batches, and returns the verdict
fields of docs/algorithm.md#rl-data (``vqa_correct``, ``vqa_acc_score``, ``vqa_gt_prob``,
``vqa_rel_score``). For Lever-Plus the environment is a vision-language model behind a
server; the tests and the quality benchmark use the digits environment of
``examples/digits_env``.

A :class:`Judge` wraps the chosen environment: it checks every answer (one line naming
the plugin when one is unusable), keeps every verdict in a :class:`VerdictStore`
(SQLite, keyed by the environment's name and version, the query and the sequence) so
that nothing is judged twice, and counts the new verdicts per query.
"""

from __future__ import annotations

import math
import os
import sqlite3
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from .errors import LeverError, PluginError

#: The verdict fields a judge returns.
VERDICT_FIELDS = ("vqa_correct", "vqa_acc_score", "vqa_gt_prob", "vqa_rel_score")
#: Format of the store's schema.
STORE_FORMAT = "1"


class Environment:
    """A downstream judge. Subclass it, set ``name`` and ``version``, implement ``judge``.

    ``version`` must change whenever the judge would answer differently (another model,
    prompt or threshold): verdicts are stored and reused under it. ``cheap`` says that
    calling it on every ordered sequence of a pool is affordable, which enables the exact
    ``random`` expectation and the ``best`` baseline of ``lever-train evaluate``.
    """

    name: str = ""
    version: str = "0"
    cheap: bool = False

    def judge(
        self, query_ids: Sequence[int], sequences: Sequence[Sequence[int]]
    ) -> Sequence[Mapping[str, float]]:
        """One verdict (a mapping with the ``VERDICT_FIELDS``) per (query, sequence) pair."""
        raise NotImplementedError


def default_store_path() -> Path:
    """``$XDG_CACHE_HOME/lever-train/verdicts.sqlite`` (``~/.cache`` when unset)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lever-train" / "verdicts.sqlite"


def sequence_key(sequence: Sequence[int]) -> str:
    """The stored form of an ordered sequence of global ids: ``"12,7"``."""
    return ",".join(str(int(g)) for g in sequence)


class VerdictStore:
    """Verdicts in SQLite: ``(env, version, query, sequence) -> fields``; safe to share.

    Several processes may read and write one store at once (write-ahead log, a busy
    timeout, every write one transaction; a verdict already present is kept as it is).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise LeverError(
                f"--store: cannot create {self.path.parent} ({exc.strerror})"
            ) from None
        try:
            self.db = sqlite3.connect(str(self.path), timeout=60.0)
            self.db.execute("PRAGMA busy_timeout = 60000")
            existing = {
                row[0]
                for row in self.db.execute("SELECT name FROM sqlite_master WHERE type='table'")
            }
            if existing and "lever_store" not in existing:
                raise LeverError(
                    f"{self.path}: not a lever-train verdict store (it holds tables "
                    f"{', '.join(sorted(existing))})"
                )
            if not existing:
                self._create()
            fmt = self.db.execute("SELECT value FROM lever_store WHERE key='format'").fetchone()
            if fmt is None or fmt[0] != STORE_FORMAT:
                raise LeverError(
                    f"{self.path}: verdict store format {fmt[0] if fmt else None!r}, this "
                    f"lever-train reads format {STORE_FORMAT}"
                )
        except sqlite3.DatabaseError as exc:
            raise LeverError(f"{self.path}: not a readable verdict store ({exc})") from None

    def _create(self) -> None:
        with self.db:
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute(
                "CREATE TABLE IF NOT EXISTS lever_store (key TEXT PRIMARY KEY, value TEXT)"
            )
            self.db.execute(
                "INSERT OR IGNORE INTO lever_store VALUES ('format', ?)", (STORE_FORMAT,)
            )
            self.db.execute(
                "CREATE TABLE IF NOT EXISTS verdicts (env TEXT, version TEXT, query INTEGER, "
                "sequence TEXT, correct REAL, acc REAL, gt_prob REAL, rel REAL, created REAL, "
                "PRIMARY KEY (env, version, query, sequence))"
            )
            self.db.execute(
                "CREATE TABLE IF NOT EXISTS pools (env TEXT, version TEXT, query INTEGER, "
                "pool TEXT, PRIMARY KEY (env, version, query))"
            )

    def versions(self, env: str) -> dict[str, int]:
        """``{version: verdicts}`` the store holds for ``env``."""
        rows = self.db.execute(
            "SELECT version, COUNT(*) FROM verdicts WHERE env=? GROUP BY version", (env,)
        )
        return {str(v): int(n) for v, n in rows}

    def get(
        self, env: str, version: str, keys: Sequence[tuple[int, str]]
    ) -> dict[tuple[int, str], dict[str, float]]:
        """The stored verdicts among ``keys`` ((query, sequence key) pairs)."""
        out: dict[tuple[int, str], dict[str, float]] = {}
        by_query: dict[int, list[str]] = {}
        for q, s in keys:
            by_query.setdefault(q, []).append(s)
        for q, seqs in by_query.items():
            for start in range(0, len(seqs), 500):
                chunk = seqs[start : start + 500]
                marks = ",".join("?" * len(chunk))
                rows = self.db.execute(
                    "SELECT sequence, correct, acc, gt_prob, rel FROM verdicts WHERE env=? AND "
                    f"version=? AND query=? AND sequence IN ({marks})",
                    (env, version, q, *chunk),
                )
                for seq, *fields in rows:
                    out[(q, seq)] = dict(zip(VERDICT_FIELDS, fields, strict=True))
        return out

    def put(
        self,
        env: str,
        version: str,
        items: Iterable[tuple[int, str, Mapping[str, float]]],
        pools: Mapping[int, Sequence[int]] | None = None,
    ) -> None:
        """Store verdicts (and the pools they were drawn from), in one transaction."""
        now = time.time()
        rows = [
            (env, version, q, s, *(float(v.get(f, 0.0)) for f in VERDICT_FIELDS), now)
            for q, s, v in items
        ]
        with self.db:
            self.db.executemany(
                "INSERT OR IGNORE INTO verdicts VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", rows
            )
            if pools:
                self.db.executemany(
                    "INSERT OR IGNORE INTO pools VALUES (?, ?, ?, ?)",
                    [(env, version, q, sequence_key(p)) for q, p in pools.items()],
                )

    def iter_verdicts(
        self, env: str, version: str
    ) -> Iterator[tuple[int, list[int], dict[str, float], list[int] | None]]:
        """Every stored ``(query, sequence, verdict, pool or None)`` of one environment
        version, by query."""
        pools = {
            int(q): [int(g) for g in p.split(",")]
            for q, p in self.db.execute(
                "SELECT query, pool FROM pools WHERE env=? AND version=?", (env, version)
            )
        }
        rows = self.db.execute(
            "SELECT query, sequence, correct, acc, gt_prob, rel FROM verdicts WHERE env=? AND "
            "version=? ORDER BY query, created, sequence",
            (env, version),
        )
        for q, seq, *fields in rows:
            verdict = dict(zip(VERDICT_FIELDS, fields, strict=True))
            yield int(q), [int(g) for g in seq.split(",")], verdict, pools.get(int(q))

    def close(self) -> None:
        """Close the connection."""
        self.db.close()


def check_verdict(
    value: Any, plugin: str, env: str, query: int, sequence: Sequence[int]
) -> dict[str, float]:
    """A judge's answer as a plain dict, or a :class:`PluginError` naming what is wrong."""
    where = f"plugin {plugin}: environment {env} judged query {query} sequence {list(sequence)}"
    if not isinstance(value, Mapping):
        raise PluginError(
            f"{where}: expected a mapping of verdict fields, got {type(value).__name__}"
        )
    out: dict[str, float] = {}
    for name in VERDICT_FIELDS:
        raw = value.get(name, 0.0)
        try:
            number = float(raw)
        except (TypeError, ValueError):
            raise PluginError(f"{where}: {name} is {raw!r}, expected a number") from None
        if not math.isfinite(number):
            raise PluginError(f"{where}: {name} is {raw!r}, expected a finite number")
        if name == "vqa_correct" and number not in (0.0, 1.0):
            raise PluginError(f"{where}: vqa_correct is {raw!r}, expected 0 or 1")
        out[name] = number
    return out


class Judge:
    """The run's environment behind its store: cached, checked, counted verdicts."""

    def __init__(
        self,
        env: Environment,
        plugin: str,
        store: VerdictStore | None,
        reward: Callable[[Mapping[str, float]], float],
        warn: Callable[[str], None] | None = None,
    ) -> None:
        self.env, self.plugin, self.store, self.reward = env, plugin, store, reward
        self.name, self.version = env.name, str(env.version)
        self.calls: Counter[int] = Counter()
        self._memory: dict[tuple[int, str], dict[str, float]] = {}
        if store is not None and warn is not None:
            versions = store.versions(self.name)
            others = {v: n for v, n in versions.items() if v != self.version}
            if others and self.version not in versions:
                shown = ", ".join(f"{v} ({n} verdicts)" for v, n in sorted(others.items()))
                warn(
                    f"warning: {store.path} holds verdicts of {self.name} version {shown}, "
                    f"not of this run's version {self.version}: none of them is reused"
                )

    def verdicts(
        self,
        query_ids: Sequence[int],
        sequences: Sequence[Sequence[int]],
        pools: Mapping[int, Sequence[int]] | None = None,
    ) -> list[dict[str, float]]:
        """The verdict of every (query, sequence) pair; only unseen pairs reach the judge."""
        keys = [(int(q), sequence_key(s)) for q, s in zip(query_ids, sequences, strict=True)]
        known = {k: self._memory[k] for k in keys if k in self._memory}
        missing = [k for k in dict.fromkeys(keys) if k not in known]
        if missing and self.store is not None:
            found = self.store.get(self.name, self.version, missing)
            known.update(found)
            self._memory.update(found)
            missing = [k for k in missing if k not in found]
        if missing:
            seqs = [[int(g) for g in s.split(",")] for _, s in missing]
            qids = [q for q, _ in missing]
            try:
                answers = list(self.env.judge(qids, seqs))
            except LeverError:
                raise
            except Exception as exc:
                raise PluginError(
                    f"plugin {self.plugin}: environment {self.name} failed: "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
            if len(answers) != len(missing):
                raise PluginError(
                    f"plugin {self.plugin}: environment {self.name} returned {len(answers)} "
                    f"verdicts for {len(missing)} sequences"
                )
            new = {
                k: check_verdict(a, self.plugin, self.name, q, s)
                for k, a, q, s in zip(missing, answers, qids, seqs, strict=True)
            }
            if self.store is not None:
                self.store.put(
                    self.name, self.version, ((q, s, v) for (q, s), v in new.items()), pools
                )
            for q, _ in missing:
                self.calls[q] += 1
            known.update(new)
            self._memory.update(new)
        return [known[k] for k in keys]

    def rewards(
        self,
        query_ids: Sequence[int],
        sequences: Sequence[Sequence[int]],
        pools: Mapping[int, Sequence[int]] | None = None,
    ) -> tuple[list[float], list[float]]:
        """Raw rewards (the run's reward mode) and ``vqa_correct`` of every pair."""
        verdicts = self.verdicts(query_ids, sequences, pools)
        return [self.reward(v) for v in verdicts], [v["vqa_correct"] for v in verdicts]

    def calls_per_query(self, queries: Iterable[int]) -> float:
        """New verdicts asked of the judge per query of ``queries`` (cached ones are free)."""
        qs = list(queries)
        return sum(self.calls[q] for q in qs) / max(len(qs), 1)


def environments_from_plugins(plugins: Any) -> dict[str, tuple[str, Environment]]:
    """``{name: (plugin, environment)}`` from the active plugins' ``environments`` answers."""
    found: dict[str, tuple[str, Environment]] = {}
    for plugin, answer in plugins.call_all("environments"):
        if answer is None:
            continue
        if not isinstance(answer, Mapping):
            raise PluginError(f"plugin {plugin}: hook environments must return a mapping")
        for name, env in answer.items():
            if not isinstance(env, Environment):
                raise PluginError(
                    f"plugin {plugin}: environment {name!r} is a {type(env).__name__}, "
                    "expected a lever_trainer.api.Environment"
                )
            if name in found:
                raise PluginError(
                    f"plugins {found[name][0]} and {plugin} both provide environment {name!r}"
                )
            found[name] = (plugin, env)
    return found


def export_rl_data(store: VerdictStore, env: str, version: str) -> dict[str, Any]:
    """The stored verdicts of one environment version as RL data: one query per
    judged query, one logged candidate per judged sequence."""
    out: dict[str, Any] = {
        "_meta": {"source": "lever-train export-verdicts", "env": env, "env_version": version}
    }
    for q, seq, verdict, pool in store.iter_verdicts(env, version):
        entry = out.setdefault(str(q), {"pointer_candidates": []})
        cand: dict[str, Any] = {"gen_method": "judge", **verdict}
        if pool is not None and all(g in pool for g in seq):
            entry["candidate_pool_ids"] = pool
            cand["pointer"] = [pool.index(g) for g in seq]
            cand["pointer_global"] = seq
        else:
            cand["pointer"] = seq
        cand["vqa_correct"] = int(verdict["vqa_correct"])
        entry["pointer_candidates"].append(cand)
    return out


__all__ = [
    "VERDICT_FIELDS",
    "Environment",
    "Judge",
    "VerdictStore",
    "check_verdict",
    "default_store_path",
    "environments_from_plugins",
    "export_rl_data",
]

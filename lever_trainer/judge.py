"""Downstream judges (docs/algorithm.md#judging) and the store that keeps every verdict they give.

An :class:`Environment` is contributed by a plugin through the ``environments`` hook: it
judges ordered demonstration sequences for queries, in batches, and returns the verdict
fields of docs/algorithm.md#rl-data (``vqa_correct``, ``vqa_acc_score``, ``vqa_gt_prob``,
``vqa_rel_score``). For Lever-Plus the environment is a vision-language model behind a
server; the tests and the quality benchmark use the digits environment of
``examples/digits_env``.

A :class:`Judge` wraps the chosen environment: it checks every answer (one line naming
the plugin and the field when one is unusable), keeps every verdict in a
:class:`VerdictStore` (SQLite, keyed by the environment's name and version, the query and
the sequence, with the pool it was judged with) so that nothing is judged twice, and
counts the new verdicts per query.

The environment is called through the judge driver (:mod:`lever_trainer.judge_driver`):
in batches, in worker threads the run waits on, each batch stored as it returns. A call
that outlives ``--judge-timeout`` or fails for a transient reason is asked again
(``--judge-retries``); one that still fails ends the run (one line, a snapshot to resume
from); a stop signal ends the wait at once, and an environment that raises anything at
all (``SystemExit`` and ``KeyboardInterrupt`` included) is a plugin failure, never a
silent end of the run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import sqlite3
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from .errors import LeverError, PluginError, StoreError
from .judge_driver import DriverSettings, JudgeBudgetSpent, JudgeCost, JudgeDriver, RoundProgress

#: The verdict fields a judge returns.
VERDICT_FIELDS = ("vqa_correct", "vqa_acc_score", "vqa_gt_prob", "vqa_rel_score")
#: Verdict fields an environment may declare it cannot always give (``Environment.
#: optional_fields``): ``None`` in its verdict, NULL in the store. ``vqa_correct`` is
#: never optional: every judged metric reads it.
OPTIONAL_FIELDS = ("vqa_acc_score", "vqa_gt_prob", "vqa_rel_score")
#: The key of the judged model's answer text in a verdict (optional, kept in the store
#: and written by ``export-verdicts``).
ANSWER_FIELD = "vqa_pred_answer"
#: Longest answer text the store keeps, in characters (a longer one is cut).
MAX_ANSWER_CHARS = 2000
#: Format of the store's schema: 3 keeps an answer text per verdict and lets the fields
#: of ``OPTIONAL_FIELDS`` be NULL (unavailable); 2 kept the pool of every verdict; 1 kept
#: one pool per query.
STORE_FORMAT = "3"

#: A verdict: the ``VERDICT_FIELDS`` (a number, or None for an unavailable optional
#: field) and, when the environment gives one, ``ANSWER_FIELD`` (a string).
Verdict = dict[str, Any]
#: Seconds a write waits for another process's write lock on the store.
STORE_BUSY_SECONDS = 60.0


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
    #: Verdict fields (of ``OPTIONAL_FIELDS``) this environment may leave out or set to
    #: None when it cannot give them (a server that returns no log-probabilities, say):
    #: stored as unavailable (NULL), never as a made-up number. A reward mode that reads
    #: such a field stops the run at the first verdict that lacks it. Any other missing
    #: field is a plugin error.
    optional_fields: tuple[str, ...] = ()
    #: Of those, the fields it will give in no verdict of this run (set by ``configure``:
    #: a setting that turns one off): a reward mode that reads one is refused before the
    #: first call, not at the first verdict.
    unavailable_fields: tuple[str, ...] = ()
    #: Sequences per call the environment prefers (``--judge-batch-size`` overrides it);
    #: None: a whole round in one call, right for a judge that runs in-process.
    batch_size: int | None = None

    def configure(self, options: Mapping[str, Any]) -> None:
        """Called once, before the first verdict, with the command's options (the core's
        and every plugin's, by ``dest``): an environment reads the options its plugin
        declared with ``add_options`` here. ``version`` is read after this call, so an
        option that changes the verdicts must change it. Does nothing by default."""

    def judge(
        self, query_ids: Sequence[int], sequences: Sequence[Sequence[int]]
    ) -> Sequence[Mapping[str, Any]]:
        """One verdict (a mapping with the ``VERDICT_FIELDS``) per (query, sequence) pair.

        A verdict may also carry the judged model's answer text under ``vqa_pred_answer``
        (kept in the store), and leave out the fields of ``optional_fields``.

        May be an ``async def``. Raise
        :class:`~lever_trainer.judge_driver.TransientJudgeError` for a failure worth
        asking again, :class:`~lever_trainer.judge_driver.PermanentJudgeError` for one
        that is not (see docs/judging.md). With ``--judge-concurrency`` above 1 several
        calls run at once (threads; an ``async`` judge's on one event loop)."""
        raise NotImplementedError


def default_store_path() -> Path:
    """``$XDG_CACHE_HOME/lever-train/verdicts.sqlite`` (``~/.cache`` when unset)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lever-train" / "verdicts.sqlite"


def sequence_key(sequence: Sequence[int]) -> str:
    """The stored form of an ordered sequence of global ids: ``"12,7"``."""
    return ",".join(str(int(g)) for g in sequence)


def _ids(text: Any, where: str) -> list[int]:
    """A stored sequence or pool (``"12,7"``) as ids; ValueError when it is not one."""
    if not isinstance(text, str):
        raise ValueError(f"{where}: {text!r} is not a list of ids")
    try:
        return [int(g) for g in text.split(",")]
    except ValueError:
        raise ValueError(f"{where}: {text!r} is not a list of ids") from None


class VerdictStore:
    """Verdicts in SQLite: ``(env, version, query, sequence) -> fields``; safe to share.

    Several processes may read and write one store at once (write-ahead log, a busy
    timeout, every write one transaction; a verdict already present is kept as it is).
    Each verdict keeps the pool its query had when it was judged (``verdict_pools``), so
    runs with different pools for one query can share a store. A damaged store, or one
    whose write lock another process holds past ``busy_seconds``, is a
    :class:`~lever_trainer.errors.StoreError` naming the file and what to do.
    """

    def __init__(
        self, path: str | os.PathLike[str], busy_seconds: float = STORE_BUSY_SECONDS
    ) -> None:
        self.path = Path(path)
        self.busy_seconds = busy_seconds
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise LeverError(
                f"--store: cannot create {self.path.parent} ({exc.strerror})"
            ) from None
        with self._guard():
            self.db = sqlite3.connect(str(self.path), timeout=busy_seconds)
            self.db.execute(f"PRAGMA busy_timeout = {int(busy_seconds * 1000)}")
            existing = self._tables()
            if existing and "lever_store" not in existing:
                raise LeverError(
                    f"{self.path}: not a lever-train verdict store (it holds tables "
                    f"{', '.join(sorted(existing))})"
                )
            if not existing:
                self._create()
            fmt = self._format()
            if fmt == "1":
                self._upgrade_from_1()
                fmt = self._format()
            if fmt == "2":
                self._upgrade_from_2()
                fmt = self._format()
            if fmt != STORE_FORMAT:
                raise LeverError(
                    f"{self.path}: verdict store format {fmt!r}, this lever-train reads "
                    f"format {STORE_FORMAT}"
                )
            missing = {"verdicts", "verdict_pools"} - self._tables()
            if missing:
                raise sqlite3.DatabaseError(f"no such table: {sorted(missing)[0]}")

    @contextlib.contextmanager
    def _guard(self) -> Iterator[None]:
        """SQLite's failures as one line naming the store and what to do."""
        try:
            yield
        except sqlite3.OperationalError as exc:
            if "locked" in str(exc) or "busy" in str(exc):
                raise StoreError(
                    f"{self.path}: the verdict store stayed locked by another process for "
                    f"{self.busy_seconds:g} s; wait for that process (or stop it), then run "
                    "again"
                ) from None
            raise self._damaged(exc) from None
        except (sqlite3.DatabaseError, ValueError, TypeError) as exc:
            raise self._damaged(exc) from None

    def _damaged(self, exc: BaseException) -> StoreError:
        return StoreError(
            f"{self.path}: the verdict store is damaged ({exc}); move it aside (a new one "
            "is started in its place) or restore a backup, then run again"
        )

    def _tables(self) -> set[str]:
        return {
            str(row[0])
            for row in self.db.execute("SELECT name FROM sqlite_master WHERE type='table'")
        }

    def _format(self) -> str | None:
        row = self.db.execute("SELECT value FROM lever_store WHERE key='format'").fetchone()
        return None if row is None else str(row[0])

    def _create(self) -> None:
        with self.db:
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute(
                "CREATE TABLE IF NOT EXISTS lever_store (key TEXT PRIMARY KEY, value TEXT)"
            )
            self.db.execute(
                "INSERT OR IGNORE INTO lever_store VALUES ('format', ?)", (STORE_FORMAT,)
            )
            self._create_tables()

    def _create_tables(self) -> None:
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS verdict_pools (id INTEGER PRIMARY KEY, env TEXT, "
            "version TEXT, query INTEGER, pool TEXT, UNIQUE (env, version, query, pool))"
        )
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS verdicts (env TEXT, version TEXT, query INTEGER, "
            "sequence TEXT, correct REAL NOT NULL, acc REAL, gt_prob REAL, rel REAL, "
            "answer TEXT, created REAL, pool_id INTEGER, "
            "PRIMARY KEY (env, version, query, sequence))"
        )

    def _upgrade_from_1(self) -> None:
        """Format 1 kept one pool per query: each verdict gets that pool (and no answer
        text); the store goes straight to the current format."""
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            if self._format() != "1":  # another process upgraded it meanwhile
                return
            self.db.execute("ALTER TABLE verdicts RENAME TO verdicts_v1")
            self._create_tables()
            self.db.execute(
                "INSERT OR IGNORE INTO verdict_pools (env, version, query, pool) "
                "SELECT env, version, query, pool FROM pools"
            )
            self.db.execute(
                f"INSERT OR IGNORE INTO verdicts ({_V2_COLUMNS}) SELECT v.env, v.version, "
                "v.query, v.sequence, v.correct, v.acc, v.gt_prob, v.rel, v.created, p.id "
                "FROM verdicts_v1 v LEFT JOIN verdict_pools p ON p.env = v.env "
                "AND p.version = v.version AND p.query = v.query"
            )
            self.db.execute("DROP TABLE verdicts_v1")
            self.db.execute("DROP TABLE pools")
            self.db.execute(
                "UPDATE lever_store SET value = ? WHERE key = 'format'", (STORE_FORMAT,)
            )

    def _upgrade_from_2(self) -> None:
        """Format 2 had no answer text and no unavailable field: its verdicts are copied
        as they are, each without an answer."""
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            if self._format() != "2":  # another process upgraded it meanwhile
                return
            self.db.execute("ALTER TABLE verdicts RENAME TO verdicts_v2")
            self._create_tables()
            self.db.execute(
                f"INSERT OR IGNORE INTO verdicts ({_V2_COLUMNS}) SELECT {_V2_COLUMNS} "
                "FROM verdicts_v2"
            )
            self.db.execute("DROP TABLE verdicts_v2")
            self.db.execute(
                "UPDATE lever_store SET value = ? WHERE key = 'format'", (STORE_FORMAT,)
            )

    def versions(self, env: str) -> dict[str, int]:
        """``{version: verdicts}`` the store holds for ``env``."""
        with self._guard():
            rows = self.db.execute(
                "SELECT version, COUNT(*) FROM verdicts WHERE env=? GROUP BY version", (env,)
            ).fetchall()
            return {str(v): int(n) for v, n in rows}

    @staticmethod
    def _verdict(fields: Sequence[Any], answer: Any, where: str) -> Verdict:
        """A stored row's fields, each a finite number or, for an optional field, NULL
        (unavailable); its answer text when it has one (else the store is damaged)."""
        out: Verdict = {}
        for name, value in zip(VERDICT_FIELDS, fields, strict=True):
            if value is None and name in OPTIONAL_FIELDS:
                out[name] = None
                continue
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"{where}: {name} is {value!r}")
            out[name] = float(value)
        if answer is not None:
            if not isinstance(answer, str):
                raise ValueError(f"{where}: the answer is {answer!r}")
            out[ANSWER_FIELD] = answer
        return out

    def get(
        self, env: str, version: str, keys: Sequence[tuple[int, str]]
    ) -> dict[tuple[int, str], Verdict]:
        """The stored verdicts among ``keys`` ((query, sequence key) pairs)."""
        out: dict[tuple[int, str], Verdict] = {}
        by_query: dict[int, list[str]] = {}
        for q, s in keys:
            by_query.setdefault(q, []).append(s)
        with self._guard():
            for q, seqs in by_query.items():
                for start in range(0, len(seqs), 500):
                    chunk = seqs[start : start + 500]
                    marks = ",".join("?" * len(chunk))
                    rows = self.db.execute(
                        "SELECT sequence, correct, acc, gt_prob, rel, answer FROM verdicts WHERE "
                        f"env=? AND version=? AND query=? AND sequence IN ({marks})",
                        (env, version, q, *chunk),
                    ).fetchall()
                    for seq, *fields, answer in rows:
                        where = f"query {q} sequence {seq}"
                        out[(q, seq)] = self._verdict(fields, answer, where)
        return out

    def put(
        self,
        env: str,
        version: str,
        items: Iterable[tuple[int, str, Mapping[str, Any]]],
        pools: Mapping[int, Sequence[int]] | None = None,
    ) -> None:
        """Store verdicts, each with the pool its query was judged with, in one
        transaction. Every verdict must carry all of ``VERDICT_FIELDS`` (None, stored as
        NULL, for an unavailable optional one) and may carry ``ANSWER_FIELD``."""
        now = time.time()
        items = list(items)
        with self._guard(), self.db:
            pool_ids: dict[int, int] = {}
            for q in {q for q, _, _ in items} & set(pools or {}):
                assert pools is not None
                key = sequence_key(pools[q])
                self.db.execute(
                    "INSERT OR IGNORE INTO verdict_pools (env, version, query, pool) "
                    "VALUES (?, ?, ?, ?)",
                    (env, version, q, key),
                )
                row = self.db.execute(
                    "SELECT id FROM verdict_pools WHERE env=? AND version=? AND query=? AND pool=?",
                    (env, version, q, key),
                ).fetchone()
                pool_ids[q] = int(row[0])
            rows = [
                (
                    env,
                    version,
                    q,
                    s,
                    *(_stored_number(v, f) for f in VERDICT_FIELDS),
                    _stored_answer(v),
                    now,
                    pool_ids.get(q),
                )
                for q, s, v in items
            ]
            self.db.executemany(
                f"INSERT OR IGNORE INTO verdicts ({_V3_COLUMNS}) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                rows,
            )

    def iter_verdicts(
        self, env: str, version: str
    ) -> Iterator[tuple[int, list[int], Verdict, list[int] | None]]:
        """Every stored ``(query, sequence, verdict, pool or None)`` of one environment
        version, by query; ``pool`` is the one that verdict was judged with."""
        with self._guard():
            pools = {
                i: _ids(p, f"pool {i}")
                for i, p in self.db.execute(
                    "SELECT id, pool FROM verdict_pools WHERE env=? AND version=?",
                    (env, version),
                )
            }
            rows = self.db.execute(
                "SELECT query, sequence, correct, acc, gt_prob, rel, answer, pool_id FROM verdicts "
                "WHERE env=? AND version=? ORDER BY query, created, sequence",
                (env, version),
            )
            for q, seq, *fields, answer, pool_id in rows:
                where = f"query {q} sequence {seq}"
                verdict = self._verdict(fields, answer, where)
                if isinstance(q, bool) or not isinstance(q, int):
                    raise ValueError(f"{where}: the query is {q!r}")
                yield q, _ids(seq, where), verdict, pools.get(pool_id)

    def close(self) -> None:
        """Close the connection."""
        self.db.close()


_V2_COLUMNS = "env, version, query, sequence, correct, acc, gt_prob, rel, created, pool_id"
_V3_COLUMNS = "env, version, query, sequence, correct, acc, gt_prob, rel, answer, created, pool_id"


def _stored_number(verdict: Mapping[str, Any], name: str) -> float | None:
    value = verdict.get(name)
    if value is None and name in OPTIONAL_FIELDS:
        return None
    return float(value)  # type: ignore[arg-type]  # a checked verdict: a number


def _stored_answer(verdict: Mapping[str, Any]) -> str | None:
    answer = verdict.get(ANSWER_FIELD)
    return None if answer is None else str(answer)[:MAX_ANSWER_CHARS]


def check_verdict(
    value: Any,
    plugin: str,
    env: str,
    query: int,
    sequence: Sequence[int],
    optional: Iterable[str] = (),
) -> Verdict:
    """A judge's answer as a plain dict, or a :class:`PluginError` naming what is wrong.

    A field of ``optional`` (the environment's ``optional_fields``) may be missing or
    None: it is kept as None (unavailable). A string under ``ANSWER_FIELD`` is kept
    (cut to ``MAX_ANSWER_CHARS``)."""
    where = f"plugin {plugin}: environment {env} judged query {query} sequence {list(sequence)}"
    if not isinstance(value, Mapping):
        raise PluginError(
            f"{where}: expected a mapping of verdict fields, got {type(value).__name__}"
        )
    may_lack = set(optional) & set(OPTIONAL_FIELDS)
    out: Verdict = {}
    for name in VERDICT_FIELDS:
        if value.get(name) is None and name in may_lack:
            out[name] = None
            continue
        if name not in value:
            raise PluginError(
                f"{where}: verdict field {name} is missing (a verdict holds "
                f"{', '.join(VERDICT_FIELDS)})"
            )
        raw = value[name]
        try:
            if isinstance(raw, bool | str | bytes):
                raise TypeError
            number = float(raw)
        except (TypeError, ValueError, OverflowError):
            raise PluginError(f"{where}: {name} is {raw!r:.60}, expected a number") from None
        if not math.isfinite(number):
            raise PluginError(f"{where}: {name} is {raw!r}, expected a finite number")
        if name == "vqa_correct" and number not in (0.0, 1.0):
            raise PluginError(f"{where}: vqa_correct is {raw!r}, expected 0 or 1")
        if not 0.0 <= number <= 1.0:
            raise PluginError(f"{where}: {name} is {raw!r}, expected a number in [0, 1]")
        out[name] = number
    answer = value.get(ANSWER_FIELD)
    if answer is not None:
        if not isinstance(answer, str):
            raise PluginError(
                f"{where}: {ANSWER_FIELD} is a {type(answer).__name__}, expected a string"
            )
        out[ANSWER_FIELD] = answer[:MAX_ANSWER_CHARS]
    return out


class UnavailableFieldError(LeverError):
    """A reward mode read a verdict field the environment could not give."""

    def __init__(self, message: str, field: str = "") -> None:
        super().__init__(message)
        self.field = field


class _ReadChecked(Mapping[str, Any]):
    """A verdict as a reward mode reads it: reading an unavailable field (None) is a
    :class:`UnavailableFieldError` naming the field and the environment, not a silent 0."""

    def __init__(
        self, verdict: Mapping[str, Any], env: str, query: int, sequence: Sequence[int]
    ) -> None:
        # the sequence is formatted only for the error: rewards wrap every verdict
        self.verdict, self.env, self.query, self.sequence = verdict, env, query, sequence

    def __getitem__(self, name: str) -> Any:
        value = self.verdict[name]
        if value is None and name in VERDICT_FIELDS:
            raise UnavailableFieldError(
                f"--reward-mode needs {name}, which environment {self.env} could not give "
                f"(query {self.query}, sequence [{sequence_key(self.sequence)}]): choose a "
                f"reward mode that does not read {name}",
                name,
            )
        return value

    def get(self, name: str, default: Any = None) -> Any:
        return self[name] if name in self.verdict else default

    def __contains__(self, name: object) -> bool:
        return name in self.verdict

    def __iter__(self) -> Iterator[str]:
        return iter(self.verdict)

    def __len__(self) -> int:
        return len(self.verdict)


class _ProgressBar:
    """A tqdm bar of one judged round: verdicts done/total, calls/s and cache hits."""

    def __init__(self, name: str, total: int) -> None:
        from tqdm import tqdm

        self.bar = tqdm(
            total=total,
            desc=f"judge {name}",
            unit="verdict",
            file=sys.stderr,
            dynamic_ncols=True,
            leave=False,
        )

    def __call__(self, progress: RoundProgress) -> None:
        self.bar.update(progress.done - self.bar.n)
        self.bar.set_postfix(
            {"calls/s": f"{progress.calls_per_second:.1f}", "cache hits": progress.cache_hits},
            refresh=False,
        )

    def close(self) -> None:
        self.bar.close()


#: Seconds between two progress lines of a judged round in a log file.
PROGRESS_LOG_SECONDS = 30.0


class _ProgressLines:
    """A judged round's progress as a line every ``PROGRESS_LOG_SECONDS`` (a log file)."""

    def __init__(self, name: str, log: Callable[[str], None]) -> None:
        self.name, self.log = name, log
        self.last = time.monotonic()

    def __call__(self, progress: RoundProgress) -> None:
        now = time.monotonic()
        if now - self.last < PROGRESS_LOG_SECONDS or progress.done >= progress.total:
            return
        self.last = now
        self.log(
            f"judge {self.name}: {progress.done}/{progress.total} verdicts, "
            f"{progress.calls_per_second:.1f} calls/s, {progress.cache_hits} cache hits"
        )


class Judge:
    """The run's environment behind its store: cached, checked, counted verdicts.

    Unseen pairs go to the environment through a :class:`~lever_trainer.judge_driver.JudgeDriver`
    (batches, concurrency, timeout, retries, rate limit, budget: ``driver``); each batch's
    verdicts are checked and stored as soon as it returns."""

    def __init__(
        self,
        env: Environment,
        plugin: str,
        store: VerdictStore | None,
        reward: Callable[[Mapping[str, Any]], float],
        warn: Callable[[str], None] | None = None,
        timeout: float | None = None,
        driver: DriverSettings | None = None,
    ) -> None:
        self.env, self.plugin, self.store, self.reward = env, plugin, store, reward
        self.name, self.version = env.name, str(env.version)
        settings = driver or DriverSettings()
        if timeout:
            settings = dataclasses.replace(settings, timeout=timeout)
        self.driver = JudgeDriver(env, plugin, settings)
        #: Seconds one call to the environment may take (None: no limit).
        self.timeout = settings.timeout
        #: Asked while waiting for the environment: a reason to stop (a signal's name)
        #: ends the wait with :class:`~lever_trainer.errors.JudgeStopped`.
        self.stop_reason: Callable[[], str | None] | None = None
        #: Whether a spent ``--judge-max-calls`` raises
        #: :class:`~lever_trainer.judge_driver.JudgeBudgetSpent` (a training run stops
        #: with a snapshot) rather than a :class:`LeverError` (a command that just ends).
        self.stop_on_budget = False
        #: Shows the progress of a round (a bar on a terminal); None: nothing shown.
        self.progress: Callable[[RoundProgress], None] | None = None
        #: Where a round's progress goes when standard error is not a terminal (a log
        #: file): a line every ``PROGRESS_LOG_SECONDS``; None: nowhere.
        self.log: Callable[[str], None] | None = None
        self.calls: Counter[int] = Counter()
        self._memory: dict[tuple[int, str], Verdict] = {}
        self._refuse_unavailable_reads()
        if store is not None and warn is not None:
            versions = store.versions(self.name)
            others = {v: n for v, n in versions.items() if v != self.version}
            if others and self.version not in versions:
                shown = ", ".join(f"{v} ({n} verdicts)" for v, n in sorted(others.items()))
                warn(
                    f"warning: {store.path} holds verdicts of {self.name} version {shown}, "
                    f"not of this run's version {self.version}: none of them is reused"
                )

    def _refuse_unavailable_reads(self) -> None:
        """Before any call: a reward mode that reads a field the environment gives in no
        verdict of this run (``unavailable_fields``) is one line now, not after the first
        batch. The reward is tried on a made-up verdict (every field 0, ``vqa_correct``
        0 and 1) whose unavailable fields are None; other failures are left for the
        real verdicts to show."""
        never = set(getattr(self.env, "unavailable_fields", ()) or ()) & set(OPTIONAL_FIELDS)
        if not never:
            return
        for correct in (0.0, 1.0):
            probe: Verdict = {f: (None if f in never else 0.0) for f in VERDICT_FIELDS}
            probe["vqa_correct"] = correct
            try:
                self.reward(_ReadChecked(probe, self.name, -1, ()))
            except UnavailableFieldError as exc:
                raise UnavailableFieldError(
                    f"--reward-mode needs {exc.field}, which environment {self.name} gives "
                    f"in no verdict with this run's settings: choose a reward mode that "
                    f"does not read {exc.field}, or the settings that give it",
                    exc.field,
                ) from None
            except Exception:
                return

    @property
    def cost(self) -> JudgeCost:
        """What judging has cost this process so far (calls, seconds, cache hits, retries)."""
        return self.driver.cost

    def verdicts(
        self,
        query_ids: Sequence[int],
        sequences: Sequence[Sequence[int]],
        pools: Mapping[int, Sequence[int]] | None = None,
    ) -> list[Verdict]:
        """The verdict of every (query, sequence) pair; only unseen pairs reach the judge,
        batch by batch, each batch stored as it returns."""
        keys = [(int(q), sequence_key(s)) for q, s in zip(query_ids, sequences, strict=True)]
        known = {k: self._memory[k] for k in keys if k in self._memory}
        wanted = list(dict.fromkeys(keys))
        missing = [k for k in wanted if k not in known]
        if missing and self.store is not None:
            found = self.store.get(self.name, self.version, missing)
            known.update(found)
            self._memory.update(found)
            missing = [k for k in missing if k not in found]
        cost = self.driver.cost
        cost.asked += len(wanted)
        cost.cache_hits += len(wanted) - len(missing)
        if missing:
            self._judge(missing, known, pools, len(wanted) - len(missing))
        return [known[k] for k in keys]

    def _judge(
        self,
        missing: list[tuple[int, str]],
        known: dict[tuple[int, str], Verdict],
        pools: Mapping[int, Sequence[int]] | None,
        hits: int,
    ) -> None:
        """Ask the driver for the ``missing`` pairs; store each batch as it returns."""

        optional = (
            *(getattr(self.env, "optional_fields", ()) or ()),
            *(getattr(self.env, "unavailable_fields", ()) or ()),
        )

        def on_batch(qids: list[int], seqs: list[list[int]], answers: list[Any]) -> None:
            new = {
                (q, sequence_key(s)): check_verdict(a, self.plugin, self.name, q, s, optional)
                for a, q, s in zip(answers, qids, seqs, strict=True)
            }
            if self.store is not None:
                self.store.put(
                    self.name, self.version, ((q, s, v) for (q, s), v in new.items()), pools
                )
            for q in qids:
                self.calls[q] += 1
            known.update(new)
            self._memory.update(new)

        seqs = [[int(g) for g in s.split(",")] for _, s in missing]
        qids = [q for q, _ in missing]
        show = self.progress if self.progress is not None else self._bar(len(missing))
        try:
            self.driver.run(qids, seqs, on_batch, self.stop_reason, show, hits)
        except JudgeBudgetSpent as spent:
            if self.stop_on_budget:
                raise
            raise LeverError(
                f"stopped by {spent.reason}; the verdicts asked so far are stored: run "
                "again (with a larger --judge-max-calls) to continue"
            ) from None
        finally:
            close = getattr(show, "close", None)
            if close is not None:
                close()

    def _bar(self, total: int) -> Callable[[RoundProgress], None] | None:
        """A progress bar on a terminal for a round of ``total`` verdicts; in a log file,
        a line now and then (through ``log``); else None."""
        if total < 2:
            return None
        if not sys.stderr.isatty():
            return None if self.log is None else _ProgressLines(self.name, self.log)
        return _ProgressBar(self.name, total)

    def rewards(
        self,
        query_ids: Sequence[int],
        sequences: Sequence[Sequence[int]],
        pools: Mapping[int, Sequence[int]] | None = None,
    ) -> tuple[list[float], list[float]]:
        """Raw rewards (the run's reward mode) and ``vqa_correct`` of every pair.

        A reward mode that reads a field the environment could not give (None) stops
        with one line naming the field and the environment (the verdicts are stored)."""
        verdicts = self.verdicts(query_ids, sequences, pools)
        rewards = [
            self.reward(_ReadChecked(v, self.name, int(q), s))
            for v, q, s in zip(verdicts, query_ids, sequences, strict=True)
        ]
        return rewards, [float(v["vqa_correct"]) for v in verdicts]

    def calls_per_query(self, queries: Iterable[int]) -> float:
        """New verdicts asked of the judge per query of ``queries`` (cached ones are free)."""
        qs = list(queries)
        return sum(self.calls[q] for q in qs) / max(len(qs), 1)

    def forget(self) -> None:
        """Drop the verdicts kept in memory (the store keeps them): a long job that never
        asks for a past query again (``lever-train collect``, chunk by chunk) holds
        only its current chunk's."""
        self._memory.clear()


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


def export_rl_data(
    store: VerdictStore, env: str, version: str, shots: int | None = None
) -> dict[str, Any]:
    """The stored verdicts of one environment version as RL data (docs/algorithm.md#rl-data):
    one query per judged query, one logged candidate per judged sequence.

    A query judged with one pool gets that pool as ``candidate_pool_ids``; one judged with
    several (runs with different pools sharing the store) gets their union, in the order
    first seen, so that every sequence indexes it (``_meta.queries_with_several_pools``
    counts them). A query whose verdicts carry no pool lists global ids only.

    ``shots``: only the sequences of that many demonstrations (a store that ``lever-train
    collect`` filled also holds the shorter sequences of its beam search). Without it,
    sequences of several lengths are a :class:`LeverError` naming ``--shots``: RL data
    holds one length."""
    out: dict[str, Any] = {
        "_meta": {"source": "lever-train export-verdicts", "env": env, "env_version": version}
    }
    several = 0
    query: int | None = None
    group: list[tuple[list[int], Verdict, list[int] | None]] = []

    def flush() -> None:
        nonlocal several
        if query is None:
            return
        pools = list(dict.fromkeys(sequence_key(p) for _, _, p in group if p is not None))
        several += len(pools) > 1
        union: dict[int, int] = {}
        for key in pools:
            for g in key.split(","):
                union.setdefault(int(g), len(union))
        if union:
            for seq, _, _ in group:  # a verdict stored without its pool
                for gid in seq:
                    union.setdefault(gid, len(union))
        cands = []
        for seq, verdict, _ in group:
            cand: dict[str, Any] = {"gen_method": "judge", **verdict}
            if union:
                cand["pointer"] = [union[g] for g in seq]
                cand["pointer_global"] = seq
            else:
                cand["pointer"] = seq
            cand["vqa_correct"] = int(verdict["vqa_correct"])
            cands.append(cand)
        entry: dict[str, Any] = {"pointer_candidates": cands}
        if union:
            entry = {"candidate_pool_ids": list(union), **entry}
        out[str(query)] = entry

    lengths: set[int] = set()
    for q, seq, verdict, pool in store.iter_verdicts(env, version):
        if shots is not None and len(seq) != shots:
            continue
        lengths.add(len(seq))
        if shots is None and len(lengths) > 1:
            raise LeverError(
                f"--shots: the store holds sequences of {' and '.join(map(str, sorted(lengths)))} "
                f"demonstrations for {env} {version} (collect also judges shorter ones); "
                "name the length to export"
            )
        if q != query:
            flush()
            query, group = q, []
        group.append((seq, verdict, pool))
    flush()
    if several:
        out["_meta"]["queries_with_several_pools"] = several
    return out


__all__ = [
    "ANSWER_FIELD",
    "OPTIONAL_FIELDS",
    "VERDICT_FIELDS",
    "Environment",
    "Judge",
    "UnavailableFieldError",
    "Verdict",
    "VerdictStore",
    "check_verdict",
    "default_store_path",
    "environments_from_plugins",
    "export_rl_data",
]

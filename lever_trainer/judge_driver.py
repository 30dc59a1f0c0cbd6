"""The judge driver: how the unseen pairs of a round reach a slow judge.

:class:`JudgeDriver` cuts the (query, sequence) pairs the verdict store does not hold
into batches (``--judge-batch-size``, else the environment's ``batch_size``; ``None``:
one batch) and keeps up to ``--judge-concurrency`` of them in flight. Each batch is
handed back (``on_batch``) as soon as it returns, so that the caller stores it at once:
a kill loses at most the batches in flight.

Failures. Each call may last ``--judge-timeout`` seconds. A call that fails with a
*transient* error is asked again, up to ``--judge-retries`` times, after an exponential
backoff with jitter (``backoff * 2**(attempt - 1)`` seconds, capped at ``backoff_max``,
of which a random half is waited off); any other failure ends the round at once.
Transient: :class:`TransientJudgeError`, ``TimeoutError`` and ``ConnectionError``
(and their subclasses), and a call past ``--judge-timeout``. Permanent:
:class:`PermanentJudgeError`, a wrong number of verdicts, and every other exception
(a bug does not heal by asking again). A failure that outlives its retries is one line
naming the plugin, the environment, the batch (its number and first query id) and
the cause.

Rate and budget. ``--judge-max-rps`` bounds the batches (calls to the environment)
started per second; ``--judge-max-calls`` bounds the verdicts this process asks of the
environment (retries included): the driver asks what fits, then raises
:class:`JudgeBudgetSpent`, which a training run turns into a clean stop with a
resumable snapshot.

``judge`` may be a plain method (called in a worker thread, one per call) or an
``async def`` (run on one event loop of the driver's own, in a background thread, so
that its batches in flight are awaited together). This module imports neither torch
nor click.
"""

from __future__ import annotations

import asyncio
import inspect
import queue
import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .coreoptions import CORE_OPTIONS
from .errors import JudgeStopped, LeverError, PluginError
from .options import Option


class TransientJudgeError(Exception):
    """Raised by an environment for a failure worth asking again (a server busy or
    restarting, a dropped connection): the driver retries the batch with backoff."""


class PermanentJudgeError(Exception):
    """Raised by an environment for a failure that asking again cannot mend (a bad
    request, a missing model): the run ends at once, naming the batch."""


class JudgeBudgetSpent(JudgeStopped):
    """``--judge-max-calls`` is spent: the verdicts that fitted are stored; the run
    stops as on a stop request (a training run keeps a resumable snapshot)."""


#: The driver's options (``--judge-timeout`` aside), as the core's option table declares
#: them; ``lever-train train`` and ``lever-train evaluate`` take them.
DRIVER_DESTS = (
    "judge_batch_size",
    "judge_concurrency",
    "judge_retries",
    "judge_max_rps",
    "judge_max_calls",
)
DRIVER_OPTIONS: tuple[Option, ...] = tuple(o for o in CORE_OPTIONS if o.dest in DRIVER_DESTS)

#: Seconds before the first retry; each further retry waits twice as long.
BACKOFF_SECONDS = 1.0
#: The longest wait before a retry.
BACKOFF_MAX_SECONDS = 30.0


@dataclass(frozen=True)
class DriverSettings:
    """How the driver calls the judge. The defaults (one batch, no retry, no limit) are
    those of a :class:`~lever_trainer.judge.Judge` built in code; the command line's
    defaults are :data:`DRIVER_OPTIONS`'."""

    batch_size: int | None = None
    concurrency: int = 1
    timeout: float | None = None
    retries: int = 0
    max_rps: float = 0.0
    max_calls: int = 0
    backoff: float = BACKOFF_SECONDS
    backoff_max: float = BACKOFF_MAX_SECONDS

    @classmethod
    def from_settings(cls, settings: Any) -> DriverSettings:
        """The settings of a run's typed settings (the same fields as the options)."""
        names = ("judge_timeout", *DRIVER_DESTS)
        return cls.from_options({n: getattr(settings, n, None) for n in names})

    @classmethod
    def from_options(cls, opts: Mapping[str, Any]) -> DriverSettings:
        """The settings of parsed options (``judge_timeout`` and :data:`DRIVER_OPTIONS`'
        dests); a missing one takes the command line's default."""
        defaults = {o.dest: o.default for o in DRIVER_OPTIONS}

        def get(name: str) -> Any:
            value = opts.get(name)
            return defaults[name] if value is None else value

        size = opts.get("judge_batch_size")
        return cls(
            batch_size=int(size) if size else None,
            concurrency=int(get("judge_concurrency")),
            timeout=float(opts.get("judge_timeout") or 0) or None,
            retries=int(get("judge_retries")),
            max_rps=float(get("judge_max_rps")),
            max_calls=int(get("judge_max_calls")),
        )


def is_transient(error: BaseException) -> bool:
    """Whether a failed call is worth asking again (see the module docstring)."""
    if isinstance(error, PermanentJudgeError):
        return False
    return isinstance(error, TransientJudgeError | TimeoutError | ConnectionError)


def backoff_delay(attempt: int, base: float, cap: float, rng: random.Random) -> float:
    """Seconds to wait before retry number ``attempt`` (1, 2, ...): ``d = min(cap,
    base * 2**(attempt - 1))``, then a uniform draw in ``[d / 2, d]`` so that callers
    that failed together do not come back together."""
    d = min(cap, base * 2.0 ** (attempt - 1))
    return d / 2 + rng.uniform(0.0, d / 2)


@dataclass
class JudgeCost:
    """What judging has cost so far (this process): ``calls`` verdicts asked of the
    environment in ``batches`` calls (retries included), ``retries`` calls asked again,
    ``seconds`` spent waiting for it, ``asked`` verdicts wanted by the run and
    ``cache_hits`` of them found in memory or in the store."""

    calls: int = 0
    batches: int = 0
    retries: int = 0
    seconds: float = 0.0
    asked: int = 0
    cache_hits: int = 0

    def copy(self) -> JudgeCost:
        return JudgeCost(**vars(self))

    def since(self, mark: JudgeCost) -> JudgeCost:
        """The cost between ``mark`` and now."""
        return JudgeCost(**{k: v - getattr(mark, k) for k, v in vars(self).items()})

    def metrics(self) -> dict[str, float]:
        """As the metrics ``judge_calls``, ``judge_seconds``, ``judge_cache_hit_rate``
        (of the verdicts wanted, the share that cost nothing; 0 when none was wanted)
        and ``judge_retries``."""
        return {
            "judge_calls": float(self.calls),
            "judge_seconds": float(self.seconds),
            "judge_cache_hit_rate": self.cache_hits / self.asked if self.asked else 0.0,
            "judge_retries": float(self.retries),
        }


@dataclass
class _Batch:
    index: int
    query_ids: list[int]
    sequences: list[list[int]]
    attempts: int = 0
    ready_at: float = 0.0

    @staticmethod
    def split(
        query_ids: Sequence[int], sequences: Sequence[Sequence[int]], size: int
    ) -> list[_Batch]:
        """The pairs in batches of ``size`` (the last one shorter), in order."""
        return [
            _Batch(
                i,
                [int(q) for q in query_ids[s : s + size]],
                [list(x) for x in sequences[s : s + size]],
            )
            for i, s in enumerate(range(0, len(sequences), size))
        ]


@dataclass
class _Flight:
    batch: _Batch
    attempt: int
    started: float
    #: The call's future when the judge is ``async`` (cancelled when given up).
    future: Any = None


@dataclass
class RoundProgress:
    """Handed to the progress callback after each returned batch."""

    done: int
    total: int
    calls_per_second: float
    cache_hits: int
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Tally:
    """One round's count of verdicts returned, for the progress report."""

    total: int
    started: float
    calls_at_start: int
    cache_hits: int
    done: int = 0

    def progress(self, now: float, calls: int) -> RoundProgress:
        rate = (calls - self.calls_at_start) / max(now - self.started, 1e-9)
        return RoundProgress(self.done, self.total, rate, self.cache_hits)


class JudgeDriver:
    """Calls one environment for many pairs, in batches (see the module docstring).

    ``clock`` and ``sleep`` are injectable so that tests can drive the rate limit and the
    backoff without waiting; ``rng`` draws the jitter."""

    def __init__(
        self,
        env: Any,
        plugin: str,
        settings: DriverSettings | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
    ) -> None:
        self.env, self.plugin = env, plugin
        self.settings = settings or DriverSettings()
        self.clock, self.sleep = clock, sleep
        self.rng = rng or random.Random()
        self.cost = JudgeCost()
        self._last_start: float | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_lock = threading.Lock()

    @property
    def name(self) -> str:
        return str(self.env.name)

    def batch_size(self, n: int) -> int:
        """The batch size for ``n`` unseen pairs."""
        size = self.settings.batch_size or getattr(self.env, "batch_size", None)
        return max(1, min(int(size), n)) if size else max(n, 1)

    # -- one round -------------------------------------------------------------------
    def run(
        self,
        query_ids: Sequence[int],
        sequences: Sequence[Sequence[int]],
        on_batch: Callable[[list[int], list[list[int]], list[Any]], None],
        stop_reason: Callable[[], str | None] | None = None,
        progress: Callable[[RoundProgress], None] | None = None,
        cache_hits: int = 0,
    ) -> None:
        """Judge every pair; ``on_batch(query_ids, sequences, answers)`` for each batch
        as it returns (in the order they return). Raises a :class:`PluginError` for a
        failure that outlived its retries, :class:`JudgeStopped` when ``stop_reason``
        answers, :class:`JudgeBudgetSpent` when the budget cannot cover the rest."""
        n = len(sequences)
        if n == 0:
            return
        size = self.batch_size(n)
        todo = _Batch.split(query_ids, sequences, size)
        total_batches = len(todo)
        results: queue.Queue[tuple[int, int, bool, Any]] = queue.Queue()
        flights: dict[int, _Flight] = {}
        tally = _Tally(n, self.clock(), self.cost.calls, cache_hits)
        try:
            while todo or flights:
                reason = stop_reason() if stop_reason is not None else None
                if reason is not None:
                    raise JudgeStopped(reason)
                now = self.clock()
                self._expire(flights, todo, now, total_batches)
                wait_for = self._start_ready(todo, flights, results, now)
                if not flights:
                    if todo:
                        self.sleep(max(wait_for, 0.0))
                    continue
                try:
                    index, attempt, ok, value = results.get(timeout=max(wait_for, 0.001))
                except queue.Empty:
                    continue
                flight = flights.get(index)
                if flight is None or flight.attempt != attempt:
                    continue  # the late answer of a call given up for its timeout
                del flights[index]
                if ok:
                    self._returned(flight.batch, value, total_batches, on_batch)
                    tally.done += len(flight.batch.sequences)
                    if progress is not None:
                        progress(tally.progress(self.clock(), self.cost.calls))
                    continue
                self._failed(flight.batch, value, todo, total_batches, self.clock())
        finally:
            self.cost.seconds += max(self.clock() - tally.started, 0.0)
            for flight in flights.values():  # a stop or a failure: the rest is given up
                if flight.future is not None:
                    flight.future.cancel()

    def _start_ready(
        self,
        todo: list[_Batch],
        flights: dict[int, _Flight],
        results: queue.Queue[tuple[int, int, bool, Any]],
        now: float,
    ) -> float:
        """Start what the concurrency, the rate limit, the backoff and the budget allow;
        the seconds until something else could start (at most 0.05)."""
        wait_for = 0.05
        budget = self.settings.max_calls
        while todo and len(flights) < self.settings.concurrency:
            batch = min(todo, key=lambda b: (b.ready_at, b.index))
            at = max(batch.ready_at, self._rate_ready())
            if at > now:
                return min(wait_for, at - now)
            if budget and self.cost.calls + len(batch.sequences) > budget:
                if not flights:
                    raise JudgeBudgetSpent(self._budget_line(todo))
                break
            todo.remove(batch)
            self._launch(batch, results, flights, now)
        return wait_for

    def _returned(
        self,
        batch: _Batch,
        value: Any,
        total_batches: int,
        on_batch: Callable[[list[int], list[list[int]], list[Any]], None],
    ) -> None:
        """A batch's answers: one per sequence, handed to ``on_batch``."""
        answers = list(value)
        if len(answers) != len(batch.sequences):
            raise PluginError(
                f"plugin {self.plugin}: environment {self.name} returned "
                f"{len(answers)} verdicts for {len(batch.sequences)} sequences "
                f"({self._where(batch, total_batches)})"
            )
        on_batch(batch.query_ids, batch.sequences, answers)

    def _where(self, batch: _Batch, total: int) -> str:
        return f"batch {batch.index + 1} of {total}, first query {batch.query_ids[0]}"

    def _budget_line(self, todo: list[_Batch]) -> str:
        left = sum(len(b.sequences) for b in todo)
        return (
            f"the judge budget (--judge-max-calls {self.settings.max_calls}: "
            f"{self.cost.calls} verdicts asked, this round needs {left} more)"
        )

    def _rate_ready(self) -> float:
        """When the rate limit lets the next call start."""
        rps = self.settings.max_rps
        if not rps or self._last_start is None:
            return float("-inf")
        return self._last_start + 1.0 / rps

    def _launch(
        self,
        batch: _Batch,
        results: queue.Queue[tuple[int, int, bool, Any]],
        flights: dict[int, _Flight],
        now: float,
    ) -> None:
        batch.attempts += 1
        attempt = batch.attempts
        if attempt > 1:
            self.cost.retries += 1
        self.cost.calls += len(batch.sequences)
        self.cost.batches += 1
        self._last_start = now
        flights[batch.index] = _Flight(batch, attempt, now)
        qids, seqs, index = list(batch.query_ids), [list(s) for s in batch.sequences], batch.index
        if inspect.iscoroutinefunction(self.env.judge):
            flights[index].future = self._launch_async(qids, seqs, index, attempt, results)
            return

        def work() -> None:
            try:
                answer = self.env.judge(qids, seqs)
                if inspect.isawaitable(answer):  # a sync method handing back a coroutine
                    answer = asyncio.run(_awaited(answer))
                results.put((index, attempt, True, list(answer)))
            except BaseException as exc:  # SystemExit, KeyboardInterrupt: a failure too
                results.put((index, attempt, False, exc))

        # a daemon thread: a judge that never returns cannot keep the process alive
        threading.Thread(target=work, name=f"judge {self.name} {index}", daemon=True).start()

    def _launch_async(
        self,
        qids: list[int],
        seqs: list[list[int]],
        index: int,
        attempt: int,
        results: queue.Queue[tuple[int, int, bool, Any]],
    ) -> Any:
        loop = self._event_loop()

        async def work() -> None:
            try:
                answer = await self.env.judge(qids, seqs)
                results.put((index, attempt, True, list(answer)))
            except asyncio.CancelledError:
                raise  # given up (a timeout, a stop): nobody waits for it
            except BaseException as exc:
                results.put((index, attempt, False, exc))

        return asyncio.run_coroutine_threadsafe(work(), loop)

    def _event_loop(self) -> asyncio.AbstractEventLoop:
        """The driver's event loop, running in a daemon thread (started once)."""
        with self._loop_lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                threading.Thread(
                    target=loop.run_forever, name=f"judge {self.name} loop", daemon=True
                ).start()
                self._loop = loop
            return self._loop

    def _expire(
        self, flights: dict[int, _Flight], todo: list[_Batch], now: float, total: int
    ) -> None:
        """Calls past ``--judge-timeout`` fail (transient): given up, maybe asked again."""
        timeout = self.settings.timeout
        if timeout is None:
            return
        for index, flight in list(flights.items()):
            if now - flight.started > timeout:
                del flights[index]
                if flight.future is not None:
                    flight.future.cancel()
                self._failed(flight.batch, _TimedOut(timeout), todo, total, now)

    def _failed(
        self, batch: _Batch, error: BaseException, todo: list[_Batch], total: int, now: float
    ) -> None:
        """Schedule a retry of a transient failure, or end the round with one line."""
        if is_transient(error) and batch.attempts <= self.settings.retries:
            s = self.settings
            batch.ready_at = now + backoff_delay(batch.attempts, s.backoff, s.backoff_max, self.rng)
            todo.append(batch)
            return
        tries = f"{batch.attempts} attempts" if batch.attempts > 1 else "1 attempt"
        where = f"{self._where(batch, total)}, {tries}"
        if isinstance(error, _TimedOut):
            raise PluginError(
                f"plugin {self.plugin}: environment {self.name} gave no answer within "
                f"{error.seconds:g} s for {len(batch.sequences)} sequences (--judge-timeout), "
                f"{where}"
            )
        if isinstance(error, LeverError):
            raise error
        raise PluginError(
            f"plugin {self.plugin}: environment {self.name} failed: "
            f"{type(error).__name__}: {error} ({where})"
        ) from error

    def close(self) -> None:
        """Stop the event loop of an ``async`` judge, if one was started."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._loop = None


class _TimedOut(TimeoutError):
    def __init__(self, seconds: float) -> None:
        super().__init__(f"no answer within {seconds:g} s")
        self.seconds = seconds


async def _awaited(value: Any) -> Any:
    return await value


__all__ = [
    "DRIVER_OPTIONS",
    "DriverSettings",
    "JudgeBudgetSpent",
    "JudgeCost",
    "JudgeDriver",
    "PermanentJudgeError",
    "RoundProgress",
    "TransientJudgeError",
    "backoff_delay",
    "is_transient",
]

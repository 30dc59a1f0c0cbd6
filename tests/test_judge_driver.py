"""The judge driver: batches, concurrency, retries, rate limit, budget, per-batch storing."""

from __future__ import annotations

import asyncio
import json
import random
import sqlite3
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import lever_digits_env
import pytest
import torch
from conftest import write_json
from test_trainer import make_trainer

from lever_trainer.api import PermanentJudgeError, TransientJudgeError
from lever_trainer.errors import LeverError, PluginError
from lever_trainer.judge import VERDICT_FIELDS, Environment, Judge, VerdictStore
from lever_trainer.judge_driver import (
    DRIVER_OPTIONS,
    DriverSettings,
    JudgeBudgetSpent,
    JudgeDriver,
    backoff_delay,
    is_transient,
)
from lever_trainer.metrics import COST_METRICS
from lever_trainer.trainer import SNAPSHOT_NAME, StopRequested
from lever_trainer_plugins.policy_bilinear import CosineBilinearPolicy

FILES = lever_digits_env.files()


def verdict_of(q: int, s: Sequence[int]) -> dict[str, float]:
    """A deterministic verdict that differs from pair to pair."""
    return {
        "vqa_correct": float((q + s[-1]) % 2 == 0),
        "vqa_acc_score": ((q * 7 + sum(s)) % 11) / 10,
        "vqa_gt_prob": ((q + 3 * s[0]) % 5) / 4,
        "vqa_rel_score": (len(s) % 3) / 2,
    }


class Recorder(Environment):
    """Answers :func:`verdict_of`; records every call (its pairs); can fail on request:
    ``fail(call_number, pairs) -> exception or None``."""

    name, version = "rec", "1"

    def __init__(self, fail=None, batch_size: int | None = None) -> None:
        self.calls: list[list[tuple[int, tuple[int, ...]]]] = []
        self.fail = fail
        self.batch_size = batch_size
        self.lock = threading.Lock()

    def judge(self, query_ids, sequences):
        with self.lock:
            self.calls.append(
                [(int(q), tuple(s)) for q, s in zip(query_ids, sequences, strict=True)]
            )
            number = len(self.calls)
        if self.fail is not None:
            error = self.fail(number, list(zip(query_ids, sequences, strict=True)))
            if error is not None:
                raise error
        return [verdict_of(q, s) for q, s in zip(query_ids, sequences, strict=True)]

    def asked(self) -> list[tuple[int, tuple[int, ...]]]:
        return [pair for call in self.calls for pair in call]


def reward(v) -> float:
    return v["vqa_correct"] + v["vqa_acc_score"]


def pairs(n: int) -> tuple[list[int], list[list[int]]]:
    """``n`` distinct (query, sequence) pairs over 4 queries."""
    qids = [10 + i % 4 for i in range(n)]
    seqs = [[100 + i, 200 + (i * 3) % 17] for i in range(n)]
    return qids, seqs


def store_rows(path: Path) -> list[tuple]:
    with sqlite3.connect(path) as db:
        return sorted(
            db.execute(
                "SELECT v.env, v.version, v.query, v.sequence, v.correct, v.acc, v.gt_prob, "
                "v.rel, p.pool FROM verdicts v LEFT JOIN verdict_pools p ON p.id = v.pool_id"
            ).fetchall()
        )


POOLS = {q: [100 + q, 200 + q] for q in range(10, 14)}


# -- batching and concurrency -----------------------------------------------------------
@pytest.mark.parametrize("size, concurrency", [(3, 1), (3, 4), (1, 8), (7, 2)])
def test_batches_and_concurrency_give_the_verdicts_and_rows_of_one_call(
    tmp_path: Path, size: int, concurrency: int
) -> None:
    qids, seqs = pairs(20)
    one_env = Recorder()
    one = Judge(one_env, "recp", VerdictStore(tmp_path / "one.sqlite"), reward)
    expected = one.verdicts(qids, seqs, POOLS)
    assert len(one_env.calls) == 1  # the environment's batch_size None: one call

    env = Recorder()
    settings = DriverSettings(batch_size=size, concurrency=concurrency)
    judge = Judge(env, "recp", VerdictStore(tmp_path / "many.sqlite"), reward, driver=settings)
    got = judge.verdicts(qids, seqs, POOLS)
    assert got == expected == [verdict_of(q, s) for q, s in zip(qids, seqs, strict=True)]
    # 20 pairs in batches of `size`: ceil(20 / size) calls, each pair asked once
    assert len(env.calls) == -(-20 // size)
    assert sorted(len(c) for c in env.calls) == sorted(
        [size] * (20 // size) + ([20 % size] if 20 % size else [])
    )
    assert sorted(env.asked()) == sorted((q, tuple(s)) for q, s in zip(qids, seqs, strict=True))
    # the store rows (created times aside) are the same as after one call
    assert store_rows(tmp_path / "many.sqlite") == store_rows(tmp_path / "one.sqlite")
    assert judge.cost.calls == 20 and judge.cost.batches == len(env.calls)


def test_the_environment_batch_size_is_the_default_and_the_option_overrides_it() -> None:
    qids, seqs = pairs(10)
    env = Recorder(batch_size=4)
    Judge(env, "recp", None, reward).verdicts(qids, seqs)
    assert [len(c) for c in env.calls] == [4, 4, 2]
    env = Recorder(batch_size=4)
    Judge(env, "recp", None, reward, driver=DriverSettings(batch_size=5)).verdicts(qids, seqs)
    assert [len(c) for c in env.calls] == [5, 5]


def test_concurrency_keeps_that_many_calls_in_flight() -> None:
    """Four batches that each wait until all four are in flight: they finish only if
    the driver really runs four at once (else the barrier times out)."""
    barrier = threading.Barrier(4, timeout=10)

    class Together(Recorder):
        def judge(self, query_ids, sequences):
            barrier.wait()
            return super().judge(query_ids, sequences)

    qids, seqs = pairs(8)
    env = Together()
    judge = Judge(env, "recp", None, reward, driver=DriverSettings(batch_size=2, concurrency=4))
    assert judge.verdicts(qids, seqs) == [verdict_of(q, s) for q, s in zip(qids, seqs, strict=True)]
    assert len(env.calls) == 4


# -- async judges ---------------------------------------------------------------------------
class AsyncRecorder(Environment):
    name, version = "rec", "1"

    def __init__(self) -> None:
        self.in_flight = self.most = self.calls = 0

    async def judge(self, query_ids, sequences):
        self.calls += 1
        self.in_flight += 1
        self.most = max(self.most, self.in_flight)
        await asyncio.sleep(0.05)
        self.in_flight -= 1
        return [verdict_of(q, s) for q, s in zip(query_ids, sequences, strict=True)]


def test_an_async_judge_works_and_its_batches_are_awaited_together(tmp_path: Path) -> None:
    qids, seqs = pairs(12)
    env = AsyncRecorder()
    store = tmp_path / "a.sqlite"
    settings = DriverSettings(batch_size=2, concurrency=3)
    judge = Judge(env, "recp", VerdictStore(store), reward, driver=settings)
    assert judge.verdicts(qids, seqs, POOLS) == [
        verdict_of(q, s) for q, s in zip(qids, seqs, strict=True)
    ]
    # 6 batches, 3 at a time on one event loop (the counters are not locked: one loop)
    assert env.calls == 6 and env.most == 3
    Judge(Recorder(), "recp", VerdictStore(tmp_path / "s.sqlite"), reward).verdicts(
        qids, seqs, POOLS
    )
    assert store_rows(store) == store_rows(tmp_path / "s.sqlite")
    judge.driver.close()


# -- retries ------------------------------------------------------------------------------
class FakeTime:
    """A clock that moves only when the driver sleeps."""

    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds >= 0
        self.slept.append(seconds)
        self.now += seconds


def run_driver(env, settings, qids, seqs, fake=None, rng=None):
    fake = fake or FakeTime()
    driver = JudgeDriver(env, "recp", settings, fake.clock, fake.sleep, rng or random.Random(0))
    got: list[tuple[int, list[int], dict]] = []
    starts: list[float] = []

    def on_batch(q, s, answers) -> None:
        got.extend(zip(q, s, answers, strict=True))

    driver.run(qids, seqs, on_batch)
    return driver, got, starts


def test_a_transient_failure_is_retried_after_a_bounded_backoff() -> None:
    """The one batch fails twice (transient), then answers: 3 attempts, 2 retries. The
    k-th retry waits d/2..d with d = backoff * 2**(k-1): 0.5..1 s, then 1..2 s."""
    fake = FakeTime()
    started: list[float] = []

    def fail(number, _pairs):
        started.append(fake.now)
        return TransientJudgeError("busy") if number <= 2 else None

    qids, seqs = pairs(5)
    env = Recorder(fail)
    settings = DriverSettings(retries=3, backoff=1.0, backoff_max=30.0)
    driver, got, _ = run_driver(env, settings, qids, seqs, fake)
    assert len(env.calls) == 3 and driver.cost.retries == 2
    assert [a for _, _, a in got] == [verdict_of(q, s) for q, s in zip(qids, seqs, strict=True)]
    gap1, gap2 = started[1] - started[0], started[2] - started[1]
    assert 0.5 <= gap1 <= 1.0 and 1.0 <= gap2 <= 2.0, (gap1, gap2)
    assert driver.cost.calls == 15  # 5 verdicts asked three times


def test_backoff_is_exponential_capped_and_jittered() -> None:
    rng = random.Random(1)
    for attempt in range(1, 12):
        d = min(8.0, 0.5 * 2 ** (attempt - 1))  # base 0.5 s, cap 8 s
        draws = [backoff_delay(attempt, 0.5, 8.0, rng) for _ in range(200)]
        assert all(d / 2 <= x <= d for x in draws)
        assert max(draws) - min(draws) > d / 4  # jittered: spread over the half-interval
    assert backoff_delay(40, 1.0, 30.0, rng) <= 30.0


def test_retries_give_up_with_one_line_naming_the_environment_batch_and_cause() -> None:
    qids, seqs = pairs(6)
    first = (qids[0], seqs[0])

    def fail(number, pairs_):
        q, s = pairs_[0]
        return ConnectionError("model server went away") if (q, list(s)) == first else None

    env = Recorder(fail)
    settings = DriverSettings(batch_size=3, retries=2, backoff=0.01)
    with pytest.raises(PluginError) as info:
        run_driver(env, settings, qids, seqs)
    # the first batch asked 1 + 2 times; the second (started while the first waited to be
    # asked again) once
    assert [c[0][0] for c in env.calls].count(qids[0]) == 3 and len(env.calls) == 4
    message = str(info.value)
    assert "\n" not in message
    assert message == (
        "plugin recp: environment rec failed: ConnectionError: model server went away "
        f"(batch 1 of 2, first query {qids[0]}, 3 attempts)"
    )


@pytest.mark.parametrize(
    "error", [PermanentJudgeError("no such model"), ValueError("bad prompt"), SystemExit(3)]
)
def test_a_permanent_failure_is_not_retried(tmp_path: Path, error: BaseException) -> None:
    """Batch 2 of 3 fails: asked once; batch 1's verdicts are stored, nothing else."""
    qids, seqs = pairs(9)
    env = Recorder(lambda n, p: error if n == 2 else None)
    settings = DriverSettings(batch_size=3, retries=5, backoff=0.01)
    judge = Judge(env, "recp", VerdictStore(tmp_path / "v.sqlite"), reward, driver=settings)
    with pytest.raises(PluginError, match=r"environment rec failed: .*\(batch 2 of 3, first query"):
        judge.verdicts(qids, seqs)
    assert len(env.calls) == 2 and judge.cost.retries == 0
    stored = {(q, s) for _, _, q, s, *_ in store_rows(tmp_path / "v.sqlite")}
    assert stored == {(q, ",".join(map(str, s))) for q, s in zip(qids[:3], seqs[:3], strict=True)}


def test_which_errors_are_transient() -> None:
    assert is_transient(TransientJudgeError()) and is_transient(TimeoutError())
    assert is_transient(ConnectionResetError()) and is_transient(ConnectionError())
    assert not is_transient(PermanentJudgeError()) and not is_transient(ValueError())
    assert not is_transient(OSError()) and not is_transient(KeyboardInterrupt())


def test_a_call_past_the_timeout_is_asked_again(tmp_path: Path) -> None:
    """The first call hangs past the 0.2 s timeout; the second answers."""

    class HangsOnce(Recorder):
        def judge(self, query_ids, sequences):
            first = not self.calls
            answer = super().judge(query_ids, sequences)
            if first:
                time.sleep(3)
            return answer

    qids, seqs = pairs(4)
    env = HangsOnce()
    settings = DriverSettings(timeout=0.2, retries=1, backoff=0.01)
    judge = Judge(env, "recp", None, reward, driver=settings)
    started = time.monotonic()
    assert judge.verdicts(qids, seqs) == [verdict_of(q, s) for q, s in zip(qids, seqs, strict=True)]
    assert time.monotonic() - started < 2.5 and judge.cost.retries == 1 and len(env.calls) == 2


# -- rate limit ---------------------------------------------------------------------------
@pytest.mark.parametrize("concurrency", [1, 3])
def test_the_rate_limit_spaces_the_calls(concurrency: int) -> None:
    """--judge-max-rps 4: calls start at least 0.25 s apart (on the driver's clock), and
    no later than needed: 5 calls span 4 gaps = 1 s (+ the 0.05 s polling step each)."""
    fake = FakeTime()
    started: list[float] = []

    def note(number, _pairs):
        started.append(fake.now)

    qids, seqs = pairs(10)
    env = Recorder(note)
    settings = DriverSettings(batch_size=2, concurrency=concurrency, max_rps=4.0)
    run_driver(env, settings, qids, seqs, fake)
    assert len(started) == 5
    gaps = [b - a for a, b in zip(sorted(started), sorted(started)[1:], strict=False)]
    assert all(g >= 0.25 - 1e-9 for g in gaps), gaps
    assert started[-1] - started[0] <= 1.0 + 4 * 0.05


# -- budget -------------------------------------------------------------------------------
def test_the_budget_asks_what_fits_then_stops(tmp_path: Path) -> None:
    """Budget 7 verdicts, batches of 3: two batches (6) fit, the third (3) would exceed."""
    qids, seqs = pairs(9)
    env = Recorder()
    settings = DriverSettings(batch_size=3, max_calls=7)
    judge = Judge(env, "recp", VerdictStore(tmp_path / "v.sqlite"), reward, driver=settings)
    judge.stop_on_budget = True
    with pytest.raises(
        JudgeBudgetSpent, match=r"--judge-max-calls 7: 6 verdicts asked, this round needs 3 more"
    ):
        judge.verdicts(qids, seqs)
    assert len(store_rows(tmp_path / "v.sqlite")) == 6
    # a command that is not a training run: one line
    again = Judge(Recorder(), "recp", VerdictStore(tmp_path / "v.sqlite"), reward, driver=settings)
    qids2, seqs2 = pairs(20)
    with pytest.raises(LeverError, match="stopped by the judge budget"):
        again.verdicts(qids2, seqs2)


def budget_trainer(files, out, budget: int = 0):
    torch.manual_seed(0)
    judge = Judge(
        lever_digits_env.DigitsEnvironment(),
        "digits",
        VerdictStore(out.parent / f"{out.name}.sqlite"),
        reward,
        driver=DriverSettings(max_calls=budget),
    )
    return make_trainer(
        files,
        out,
        enable=("online",),
        judge=judge,
        policy=CosineBilinearPolicy(32, 2, 0.1, "reverse"),
        rce_epochs=1,
        rce_lr=1e-3,
        online_epochs=3,
        online_samples=4,
        batch_size=8,
    )


@pytest.fixture(scope="module")
def digits16(tmp_path_factory) -> tuple[Path, Path]:
    doc = json.loads(Path(FILES["train"]).read_text())
    keys = [k for k in doc if k.isdigit()][:16]
    path = write_json(tmp_path_factory.mktemp("d24") / "train16.json", {k: doc[k] for k in keys})
    return path, Path(FILES["embeddings"])


def test_the_budget_stops_at_an_epoch_boundary_and_resume_continues(digits16, tmp_path) -> None:
    full = budget_trainer(digits16, tmp_path / "full")
    full.fit()
    online = [h for h in full.state.history if h["phase"] == "online"]
    # the verdicts the first round and the validations up to it asked (the run's judge)
    before_round2 = sum(h["judge_calls"] for h in full.state.history[:2])
    start_calls = full.state.judge.cost.calls - sum(h["judge_calls"] for h in full.state.history)
    budget = int(start_calls + before_round2 + online[1]["judge_calls"] // 2)

    out = tmp_path / "run"
    stopped = budget_trainer(digits16, out, budget)
    with pytest.raises(StopRequested, match="the judge budget") as info:
        stopped.fit()
    assert stopped.state.judge.cost.calls <= budget
    assert (info.value.phase, info.value.epoch) == ("online", 2)
    snapshot = torch.load(out / SNAPSHOT_NAME, weights_only=True)
    assert (snapshot["phase"], snapshot["epoch"], snapshot["epoch_closed"]) == ("online", 1, True)
    resumed = budget_trainer(digits16, out)  # a new process, no budget this time
    resumed.fit(resume=snapshot)
    for key, value in full.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[key], value), key
    strip = lambda h: [{k: v for k, v in e.items() if k not in COST_METRICS} for e in h]  # noqa: E731
    assert strip(resumed.state.history) == strip(full.state.history)
    # the resumed run found round 2's stored batches in the store: cache hits, not calls
    assert resumed.state.history[2]["judge_cache_hit_rate"] > 0


# -- crash after k batches ---------------------------------------------------------------
def test_a_crash_after_k_batches_leaves_k_batches_and_the_rerun_asks_only_the_rest(
    tmp_path: Path,
) -> None:
    """Batches of 4, one at a time; the 4th call dies (SystemExit): 3 batches (12
    verdicts) are stored. A new judge on that store asks only the other 8 pairs, and
    all 20 verdicts are those of one uninterrupted call."""
    qids, seqs = pairs(20)
    store = tmp_path / "v.sqlite"
    dying = Recorder(lambda n, p: SystemExit(1) if n == 4 else None)
    settings = DriverSettings(batch_size=4, retries=3)
    with pytest.raises(PluginError, match=r"SystemExit: 1 \(batch 4 of 5"):
        Judge(dying, "recp", VerdictStore(store), reward, driver=settings).verdicts(qids, seqs)
    assert len(store_rows(store)) == 12
    first_three = {pair for call in dying.calls[:3] for pair in call}
    assert {(q, tuple(map(int, s.split(",")))) for _, _, q, s, *_ in store_rows(store)} == (
        first_three
    )
    rerun = Recorder()
    judge = Judge(rerun, "recp", VerdictStore(store), reward, driver=settings)
    assert judge.verdicts(qids, seqs) == [verdict_of(q, s) for q, s in zip(qids, seqs, strict=True)]
    asked = rerun.asked()
    assert len(asked) == 8 and not set(asked) & first_three
    assert judge.cost.cache_hits == 12 and judge.cost.asked == 20


def test_each_batch_is_in_the_store_when_the_next_one_is_asked(tmp_path: Path) -> None:
    """What a kill would leave: at the start of call k, the store holds the k - 1 earlier
    batches (concurrency 1), read through a second connection."""
    store = tmp_path / "v.sqlite"
    seen: list[int] = []

    def look(number, _pairs):
        seen.append(len(store_rows(store)))

    qids, seqs = pairs(12)
    judge = Judge(
        Recorder(look), "recp", VerdictStore(store), reward, driver=DriverSettings(batch_size=3)
    )
    judge.verdicts(qids, seqs)
    assert seen == [0, 3, 6, 9]


# -- options and metrics -----------------------------------------------------------------
def test_driver_settings_from_the_command_line_options() -> None:
    defaults = {o.dest: o.default for o in DRIVER_OPTIONS}
    assert set(defaults) == {
        "judge_batch_size",
        "judge_concurrency",
        "judge_retries",
        "judge_max_rps",
        "judge_max_calls",
    }
    settings = DriverSettings.from_options({**defaults, "judge_timeout": 2.5})
    assert settings == DriverSettings(timeout=2.5, retries=3)
    settings = DriverSettings.from_options(
        {"judge_batch_size": 16, "judge_concurrency": 8, "judge_max_rps": 2.0, "judge_max_calls": 5}
    )
    assert (settings.batch_size, settings.concurrency, settings.retries) == (16, 8, 3)
    assert (settings.max_rps, settings.max_calls, settings.timeout) == (2.0, 5, None)


def test_cost_metrics_count_calls_hits_and_retries() -> None:
    """Round 1: 6 new pairs (one transient failure of the first batch of 3: 3 asked
    twice), round 2: the same 6 and 2 new: 9 + 2 = 11 calls; hits 6 of 14 wanted."""
    failed = []

    def once(number, _pairs):
        if not failed:
            failed.append(number)
            return TransientJudgeError("busy")
        return None

    env = Recorder(once)
    settings = DriverSettings(batch_size=3, retries=1, backoff=0.001)
    judge = Judge(env, "recp", None, reward, driver=settings)
    qids, seqs = pairs(8)
    judge.verdicts(qids[:6], seqs[:6])
    mark = judge.cost.copy()
    judge.verdicts(qids, seqs)
    total = judge.cost.metrics()
    assert total["judge_calls"] == 11 and total["judge_retries"] == 1
    assert total["judge_cache_hit_rate"] == pytest.approx(6 / 14)
    second = judge.cost.since(mark).metrics()
    assert second["judge_calls"] == 2 and second["judge_cache_hit_rate"] == pytest.approx(6 / 8)
    assert all(set(VERDICT_FIELDS) == set(a) for a in [verdict_of(1, [2])])


def test_the_cli_takes_the_driver_options_and_reports_the_cost(cli, tmp_path) -> None:
    """evaluate with batches of 5 and 2 in flight: the JSON carries judge_cost, the
    table its line; a second run finds every verdict in the store (hit rate 1)."""
    doc = json.loads(Path(FILES["test"]).read_text())
    queries = dict([(k, v) for k, v in doc.items() if k.isdigit()][:6])
    qfile = write_json(tmp_path / "q.json", queries)
    args = ["evaluate", "--queries", qfile, "--img-emb", FILES["embeddings"], "--judge"]
    args += ["digits", "--store", tmp_path / "v.sqlite", "--baselines", "cosine"]
    args += ["--judge-batch-size", "5", "--judge-concurrency", "2"]
    first = cli(*args, "--output", tmp_path / "a.json")
    assert first.exit_code == 0, first.output
    cost = json.loads((tmp_path / "a.json").read_text())["judge_cost"]
    assert cost["judge_calls"] == 6 and cost["judge_cache_hit_rate"] == 0.0  # 6 picks
    assert "(judge cost: 6 verdicts asked in" in first.output
    again = cli(*args, "--output", tmp_path / "b.json")
    assert again.exit_code == 0, again.output
    cost = json.loads((tmp_path / "b.json").read_text())["judge_cost"]
    assert cost["judge_calls"] == 0 and cost["judge_cache_hit_rate"] == 1.0
    bad = cli(*args, "--judge-concurrency", "0")
    assert bad.exit_code != 0 and "--judge-concurrency" in bad.output


# -- through the command line, in subprocesses (slow) -------------------------------------
KILL_JUDGE = '''
"""Environment ``slowdigits``: the digits judge in batches of 8, 0.1 s a call, logging
every pair it is asked to the file in $KILL_JUDGE_LOG (tests of the judge driver)."""

import os
import time

from lever_digits_env import DigitsEnvironment

from lever_trainer.api import Environment, hookimpl

ENABLED_BY_DEFAULT = True


class Slow(Environment):
    name, version, batch_size = "slowdigits", "1", 8

    def __init__(self):
        self.inner = DigitsEnvironment()

    def judge(self, query_ids, sequences):
        with open(os.environ["KILL_JUDGE_LOG"], "a") as log:
            for q, s in zip(query_ids, sequences):
                log.write(f"{q}:{','.join(map(str, s))}\\n")
        time.sleep(0.1)
        return self.inner.judge(query_ids, sequences)


@hookimpl
def environments():
    return {"slowdigits": Slow()}
'''


@pytest.fixture(scope="module")
def kill_judge(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("kill_judge")
    (root / "lever_kill_judge.py").write_text(KILL_JUDGE)
    info = root / "lever_kill_judge-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: lever-kill-judge\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[lever_trainer]\nkill-judge = lever_kill_judge\n")
    return root


def lever_train(plugin: Path, log: Path, *args: object, wait: bool = True):
    import os
    import subprocess
    import sys

    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(plugin), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
        "KILL_JUDGE_LOG": str(log),
    }
    command = [sys.executable, "-m", "lever_trainer", *map(str, args)]
    proc = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    if not wait:
        return proc
    out, _ = proc.communicate(timeout=300)
    return proc.returncode, out


def run_args(data: Path, run: Path, store: Path) -> tuple[object, ...]:
    return (
        "--beam-data", data, "--img-emb", FILES["embeddings"], "--output-dir", run,
        "--store", store, "--judge", "slowdigits", "--plugin", "online", "--rce-epochs", "1",
        "--grpo-epochs", "0", "--online-epochs", "2", "--online-samples", "4",
        "--batch-size", "8", "--device", "cpu", "--judge-concurrency", "2",
    )  # fmt: skip


def asked(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


def stored(store: Path) -> list[str]:
    with sqlite3.connect(store) as db:
        return [f"{q}:{s}" for q, s in db.execute("SELECT query, sequence FROM verdicts")]


def metric_records(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [
        {k: v for k, v in json.loads(x).items() if k not in (*COST_METRICS, "time")} for x in lines
    ]


@pytest.mark.slow
def test_sigkill_mid_round_then_resume(kill_judge, digits16, tmp_path) -> None:
    """SIGKILL while round 2 is judged (batches of 8, 2 in flight): the store holds every
    batch that returned; the resumed run asks again only the pairs the store lacked (the
    batches in flight), never one it holds, and ends as the uninterrupted run."""
    import signal

    data = digits16[0]
    ref_log, ref = tmp_path / "ref.log", tmp_path / "ref"
    code, out = lever_train(kill_judge, ref_log, *run_args(data, ref, tmp_path / "ref.sqlite"))
    assert code == 0, out
    total = len(asked(ref_log))
    assert len(set(asked(ref_log))) == total  # the driver never asks one pair twice
    first_round = json.loads((ref / "metrics.jsonl").read_text().splitlines()[2])
    assert first_round["phase"] == "online"
    kill_at = int(total - 24)  # inside the last round's judging (it asks more than 24)

    log, run, store = tmp_path / "kill.log", tmp_path / "run", tmp_path / "kill.sqlite"
    proc = lever_train(kill_judge, log, *run_args(data, run, store), wait=False)
    deadline = time.monotonic() + 240
    while len(asked(log)) < kill_at:
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    before = set(asked(log))
    kept = set(stored(store))
    assert kept <= before and len(before) - len(kept) <= 2 * 8  # at most the batches in flight
    lines_before = len(asked(log))
    code, out = lever_train(kill_judge, log, "--resume", run)
    assert code == 0, out
    again = asked(log)[lines_before:]
    assert not set(again) & kept  # nothing the store held was asked again
    assert before - kept <= set(again)  # what was lost in flight was asked again
    rows = stored(store)
    assert len(rows) == len(set(rows)) == total
    assert metric_records(run) == metric_records(ref)
    from safetensors.torch import load_file

    for path in sorted(ref.glob("*.safetensors")):
        mine, theirs = load_file(str(run / path.name)), load_file(str(path))
        assert all(torch.equal(mine[k], v) for k, v in theirs.items()), path.name


@pytest.mark.slow
def test_the_budget_stops_the_cli_run_with_a_resume_line(kill_judge, digits16, tmp_path) -> None:
    data = digits16[0]
    log, run, store = tmp_path / "b.log", tmp_path / "run", tmp_path / "b.sqlite"
    code, out = lever_train(kill_judge, log, *run_args(data, run, store), "--judge-max-calls", "60")
    assert code == 3, out  # stopped, resumable
    assert "stopped by the judge budget (--judge-max-calls 60:" in out
    assert f"resume with: lever-train --resume {run}" in out
    assert len(asked(log)) <= 60 and "Traceback" not in out
    code, out = lever_train(kill_judge, log, "--resume", run, "--judge-max-calls", "0")
    assert code == 0, out
    assert len(asked(log)) == len(set(asked(log)))


def test_an_async_call_past_the_timeout_is_cancelled_and_asked_again() -> None:
    class SlowFirst(Environment):
        name, version = "rec", "1"

        def __init__(self) -> None:
            self.calls = 0
            self.cancelled = 0

        async def judge(self, query_ids, sequences):
            self.calls += 1
            try:
                if self.calls == 1:
                    await asyncio.sleep(5)
            except asyncio.CancelledError:
                self.cancelled += 1
                raise
            return [verdict_of(q, s) for q, s in zip(query_ids, sequences, strict=True)]

    qids, seqs = pairs(3)
    env = SlowFirst()
    settings = DriverSettings(timeout=0.2, retries=1, backoff=0.01)
    judge = Judge(env, "recp", None, reward, driver=settings)
    started = time.monotonic()
    assert judge.verdicts(qids, seqs) == [verdict_of(q, s) for q, s in zip(qids, seqs, strict=True)]
    assert time.monotonic() - started < 3
    time.sleep(0.1)  # the cancellation reaches the coroutine on the driver's loop
    assert (env.calls, env.cancelled, judge.cost.retries) == (2, 1, 1)
    judge.driver.close()


def test_a_round_in_a_log_file_gets_progress_lines(monkeypatch) -> None:
    """Not a terminal: a line per returned batch once the interval (here 0 s) has passed,
    none for the last (the epoch line follows)."""
    import lever_trainer.judge as judge_module

    monkeypatch.setattr(judge_module, "PROGRESS_LOG_SECONDS", 0.0)
    monkeypatch.setattr("sys.stderr.isatty", lambda: False, raising=False)
    lines: list[str] = []
    judge = Judge(Recorder(), "recp", None, reward, driver=DriverSettings(batch_size=3))
    judge.log = lines.append
    qids, seqs = pairs(12)
    judge.verdicts(qids[:3], seqs[:3])  # 3 of the 12 are then cache hits
    judge.verdicts(qids, seqs)
    assert [line.split(",")[0] for line in lines] == [
        "judge rec: 3/9 verdicts",
        "judge rec: 6/9 verdicts",
    ]
    assert all(line.endswith(", 3 cache hits") for line in lines)


def test_the_epoch_line_and_the_summary_show_the_judge_cost() -> None:
    from lever_trainer_plugins.console_log import judge_cost_line, judge_cost_text

    assert judge_cost_text({"train_loss": 1.0}) == ""
    one = {"judge_calls": 1.0, "judge_seconds": 0.25, "judge_cache_hit_rate": 0.5}
    assert judge_cost_text({**one, "judge_retries": 1.0}) == (
        "  judge: 1 call in 0.2 s, cache hits 50.0 %, 1 retry"
    )
    history = [
        {"phase": "rce", "epoch": 1, "train_loss": 1.0},
        {"phase": "online", "epoch": 1, **one, "judge_retries": 0.0},
        {"phase": "online", "epoch": 2, "judge_calls": 40.0, "judge_seconds": 2.0,
         "judge_cache_hit_rate": 0.25, "judge_retries": 3.0},
    ]  # fmt: skip
    # totals: 1 + 40 calls, 0.25 + 2.0 s, 0 + 3 retries; rates (0.5 + 0.25) / 2
    assert judge_cost_line(history) == (
        "judge cost: 41 verdicts asked in 2.2 s, 3 retries, cache hit rate 0.375 "
        "(mean over 2 epochs)"
    )
    assert judge_cost_line(history[:1]) is None
    # the summary's start -> best -> final rows are for results, not for costs
    from lever_trainer_plugins.console_log import summary_lines

    for h in history:
        h.update({"policy_reward@1": 0.5, "judge_correct@greedy": 0.5})
    rows = summary_lines({}, history, None, "max")
    assert any("judge_correct@greedy" in r for r in rows)
    assert not any(name in r for r in rows for name in COST_METRICS if name != "epoch_seconds")
